"""`rence-grade IN.jsonl --out OUT.jsonl [--workers N --timeout S --fallbacks ...]`: grade saved responses.

Each input line is an object with "response" and "answer" (other fields are kept); each output line is
the same object plus "reward", "extracted", "status" (and "detail" when there is one), graded by the
same code as training (`RewardPool`). A summary goes to stderr.

The whole input is validated before anything is graded; results are streamed, `--chunk` records at a time,
to a temporary file next to `--out`, which is renamed to `--out` only when every record is graded (an
interrupted run, SIGTERM included, leaves an existing `--out` untouched and no temporary file). `--out` may
not be the input file or a directory; both are refused before anything is graded.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from megatron_rence.config import RewardConfig
from megatron_rence.data.records import MalformedRecord, answer_text, check_unicode, read_records
from megatron_rence.rewards.extract import FALLBACKS
from megatron_rence.rewards.pool import RewardPool


def load_pairs(path: Path) -> list[dict]:
    """Records with string "response" and "answer" (answers may be finite numbers; not empty); ValueError
    names file:line."""
    records = []
    for location, record in read_records(path):
        for key in ("response", "answer"):
            if key not in record:
                raise ValueError(f"{location}: missing field {key!r}")
        if not isinstance(record["response"], str):
            raise ValueError(f"{location}: field 'response' must be a string")
        try:
            check_unicode(record["response"], "response")
            answer_text(record["answer"], "answer")  # finite, not empty, valid Unicode
        except MalformedRecord as exc:
            raise ValueError(f"{location}: {exc}") from None
        if not isinstance(record["answer"], str):
            record["answer"] = str(record["answer"])
        records.append(record)
    return records


def check_args(args: argparse.Namespace) -> None:
    """ValueError for option values that cannot work and for an --out that is the input file."""
    if args.workers < 0:
        raise ValueError(f"--workers: must be >= 0 (0 = grade in this process), got {args.workers}")
    if not args.timeout > 0:
        raise ValueError(f"--timeout: must be > 0 seconds, got {args.timeout}")
    if args.chunk < 1:
        raise ValueError(f"--chunk: must be >= 1, got {args.chunk}")
    if args.input.exists() and (args.out.resolve() == args.input.resolve()
                                or (args.out.exists() and os.path.samefile(args.out, args.input))):
        raise ValueError(f"--out {args.out} is the input file {args.input}: choose another output path")
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory: give the output file's path")


def _raise_on_sigterm(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so the temporary output file is removed (`main`'s finally)."""
    raise SystemExit(128 + signum)


def _open_temp(out: Path) -> Path:
    """An empty temporary file next to `out` (same file system, so the final rename is atomic)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not existing.is_dir():
        raise OSError(f"--out {out}: cannot write there: {existing} is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.open("w").close()
    except OSError as exc:
        raise OSError(f"--out {out}: cannot write there: {os.strerror(exc.errno).lower() if exc.errno else exc}"
                      ) from None
    return tmp


def _write_graded(f, records: list[dict], results) -> None:
    for record, result in zip(records, results):
        record.update(reward=result.reward, extracted=result.extracted, status=result.status)
        if result.detail:
            record["detail"] = result.detail
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rence-grade", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="jsonl with 'response' and 'answer' per line")
    parser.add_argument("--out", type=Path, required=True, help="output jsonl")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (0 = in-process)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per item before its worker is killed")
    parser.add_argument("--fallbacks", nargs="*", default=["last_number"], choices=FALLBACKS,
                        help="answer extraction when there is no \\boxed{} (in order)")
    parser.add_argument("--chunk", type=int, default=256, help="records graded and written per batch")
    args = parser.parse_args(argv)
    try:
        check_args(args)
        records = load_pairs(args.input)
        tmp = _open_temp(args.out)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)  # put back on return: main may be a call
    cfg = RewardConfig(num_workers=args.workers, timeout_s=args.timeout, fallbacks=list(args.fallbacks))
    seconds = 0.0
    try:
        with RewardPool(cfg) as pool, tmp.open("w") as f:
            for start in range(0, len(records), args.chunk):
                chunk = records[start:start + args.chunk]
                results = pool.grade([r["response"] for r in chunk], [r["answer"] for r in chunk])
                seconds += pool.metrics()["reward/grade_s"]
                _write_graded(f, chunk, results)
                f.flush()  # on disk chunk by chunk (the temp file), not all at the end
            metrics = pool.metrics()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    n = len(records)
    print(f"graded {n} records in {seconds:.2f}s: correct {metrics['reward/num_correct']}, "
          f"no_answer {metrics['reward/num_no_answer']}, timeout {metrics['reward/num_timeout']}, "
          f"error {metrics['reward/num_error']} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
