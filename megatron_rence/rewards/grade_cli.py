"""`rence-grade IN.jsonl --out OUT.jsonl [--workers N --timeout S --fallbacks ...]`: grade saved responses.

Each input line is an object with "response" and "answer" (other fields are kept); each output line is
the same object plus "reward", "extracted", "status" (and "detail" when there is one), graded by the
same code as training (`RewardPool`). A summary goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_rence.config import RewardConfig
from megatron_rence.data.records import read_records
from megatron_rence.rewards.extract import FALLBACKS
from megatron_rence.rewards.pool import RewardPool


def load_pairs(path: Path) -> list[dict]:
    """Records with string "response" and "answer" (answers may be numbers); ValueError names file:line."""
    records = []
    for location, record in read_records(path):
        for key in ("response", "answer"):
            if key not in record:
                raise ValueError(f"{location}: missing field {key!r}")
        if not isinstance(record["response"], str):
            raise ValueError(f"{location}: field 'response' must be a string")
        if isinstance(record["answer"], (int, float)) and not isinstance(record["answer"], bool):
            record["answer"] = str(record["answer"])
        if not isinstance(record["answer"], str):
            raise ValueError(f"{location}: field 'answer' must be a string or a number")
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rence-grade", description=__doc__.splitlines()[0])
    parser.add_argument("input", type=Path, help="jsonl with 'response' and 'answer' per line")
    parser.add_argument("--out", type=Path, required=True, help="output jsonl")
    parser.add_argument("--workers", type=int, default=2, help="grading processes (0 = in-process)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per item before its worker is killed")
    parser.add_argument("--fallbacks", nargs="*", default=["last_number"], choices=FALLBACKS,
                        help="answer extraction when there is no \\boxed{} (in order)")
    args = parser.parse_args(argv)
    try:
        records = load_pairs(args.input)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg = RewardConfig(num_workers=args.workers, timeout_s=args.timeout, fallbacks=list(args.fallbacks))
    with RewardPool(cfg) as pool:
        results = pool.grade([r["response"] for r in records], [r["answer"] for r in records])
        metrics = pool.metrics()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for record, result in zip(records, results):
            record.update(reward=result.reward, extracted=result.extracted, status=result.status)
            if result.detail:
                record["detail"] = result.detail
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n = len(records)
    print(f"graded {n} records in {metrics['reward/grade_s']:.2f}s: correct {metrics['reward/num_correct']}, "
          f"no_answer {metrics['reward/num_no_answer']}, timeout {metrics['reward/num_timeout']}, "
          f"error {metrics['reward/num_error']} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
