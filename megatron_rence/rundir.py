"""One run per run dir: locks, a fresh launch that never clobbers a run, `train.overwrite` that sets the old
run aside until the new one has a checkpoint, a writable checkpoint dir.

    with claim_run_dir(cfg, resume):   # rank 0 holds <run_dir>/.lock and <checkpoint dir>/.lock until the block exits
        ...train...                    # after each save: forget_previous_run(cfg)

Locks (runlock.py): ``flock`` on ``<run_dir>/.lock`` and on ``<checkpoint dir>/.lock`` (the same file when the
two are one directory), so two run dirs that share a `checkpoint.dir` exclude each other too. The kernel
releases a dead holder's lock: taking over a stale one is atomic.

A fresh launch (no ``--resume``) into a run dir whose checkpoint dir holds checkpoints is refused unless
``train.overwrite=true``. Overwriting moves the old run aside, it deletes nothing: the checkpoint dir's
``iter_*`` and ``latest`` go to ``<checkpoint dir>/previous_run/``, ``metrics.jsonl`` and ``tensorboard/``
to ``<run_dir>/previous_run/``, the eval dir's ``summary.jsonl`` and ``step_*`` to ``<eval dir>/previous_run/``.
A journal (``<run_dir>/overwrite.json``, written before the first move) lists the moves. The aside copies
are removed once the new run has written its first checkpoint (`forget_previous_run`); a launch that finds
the journal and no checkpoint of the new run (it crashed or was stopped before one) first moves the old run
back. A `checkpoint.load` inside the checkpoint dir that an overwrite replaces is refused (`--dry-run` too).
Only rank 0 (env RANK) touches the file system here; the other ranks return at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from megatron_rence.runlock import LOCK, DirLock, RunDirError

__all__ = ["LOCK", "RunDirError", "checkpoint_root", "claim_run_dir", "forget_previous_run", "check_writable",
           "load_inside_replaced_run"]
ASIDE = "previous_run"
JOURNAL = "overwrite.json"


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")


def eval_root(cfg) -> Path:
    return Path(cfg.eval.out_dir or Path(cfg.train.run_dir) / "eval")


def _contains(outer: Path, inner: Path) -> bool:
    outer, inner = Path(os.path.abspath(outer)), Path(os.path.abspath(inner))
    return inner == outer or outer in inner.parents


def load_inside_replaced_run(cfg) -> Optional[str]:
    """Why `checkpoint.load` cannot be used with `train.overwrite=true` (it lies in the checkpoint dir the
    overwrite sets aside and then removes), or None."""
    load = cfg.checkpoint.load
    if not (cfg.train.overwrite and load):
        return None
    root = checkpoint_root(cfg)
    if not _contains(root, Path(load)):
        return None
    return (f"{load} is inside the checkpoint dir {root} that train.overwrite=true replaces (the old run is "
            f"removed once the new run has its first checkpoint). Copy it out of {root} and point "
            f"checkpoint.load there, or use another train.run_dir / checkpoint.dir")


# ----------------------------------------------------------------------------------------------- overwrite
def _previous_run_entries(cfg) -> list[Path]:
    """What a fresh launch with train.overwrite sets aside: checkpoints, latest, metrics, TensorBoard, eval."""
    root, run_dir, evals = checkpoint_root(cfg), Path(cfg.train.run_dir), eval_root(cfg)
    entries = []
    if root.is_dir():
        entries += [p for p in sorted(root.iterdir()) if p.name.startswith(("iter_", "latest"))]
    entries += [p for p in (run_dir / "metrics.jsonl", run_dir / "tensorboard") if p.exists()]
    if evals.is_dir():
        entries += [p for p in sorted(evals.iterdir()) if p.name == "summary.jsonl" or p.name.startswith("step_")]
    return list(dict.fromkeys(entries))


def _write_journal(path: Path, state: str, moves: list[list[str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"state": state, "moves": moves}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _set_aside(cfg, entries: list[Path]) -> None:
    """Move `entries` into a `previous_run/` next to each, journaled (see the module docstring)."""
    journal = Path(cfg.train.run_dir) / JOURNAL
    moves = [[str(p), str(p.parent / ASIDE / p.name)] for p in entries]
    _write_journal(journal, "moving", moves)
    for src, dst in moves:
        Path(dst).parent.mkdir(exist_ok=True)
        os.rename(src, dst)
    _write_journal(journal, "moved", moves)
    asides = sorted({str(Path(dst).parent) for _, dst in moves})
    print(f"train.overwrite=true: the previous run is set aside in {', '.join(asides)}; it is removed when this "
          f"run has written its first checkpoint, and moved back if this launch stops before that", flush=True)


def _free_name(path: Path) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{n}")


def _restore_previous_run(journal: Path, moves: list[list[str]]) -> None:
    """Move every set-aside entry back; what the abandoned launch wrote in its place is kept as `<name>.<n>`."""
    kept = []
    for src, dst in moves:
        src_p, dst_p = Path(src), Path(dst)
        if not dst_p.exists():
            continue  # never moved (a crash mid-way), or already back
        if src_p.exists():
            spare = _free_name(src_p)
            os.rename(src_p, spare)
            kept.append(str(spare))
        os.rename(dst_p, src_p)
    for aside in {Path(dst).parent for _, dst in moves}:
        with contextlib.suppress(OSError):
            aside.rmdir()
    journal.unlink()
    print(f"an earlier train.overwrite=true launch stopped before its first checkpoint: the previous run is "
          f"back in place (from {journal.parent / ASIDE} and the other previous_run/ dirs)"
          + (f"; what that launch wrote is kept as {', '.join(kept)}" if kept else ""), flush=True)


def _read_journal(journal: Path) -> dict:
    try:
        data = json.loads(journal.read_text())
        if not (isinstance(data, dict) and data.get("state") in ("moving", "moved")
                and isinstance(data.get("moves"), list)):
            raise ValueError("not an overwrite journal")
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{journal} is unreadable ({exc}); it records where train.overwrite=true set the "
                          f"previous run aside (previous_run/ dirs): move those entries back or delete them, "
                          f"then delete {journal}") from exc
    return data


def recover_previous_run(cfg) -> None:
    """At startup: finish what an interrupted overwrite left (move the old run back, or drop it if the new run
    has a checkpoint)."""
    from megatron_rence.megatron.checkpoint import complete_checkpoints

    journal = Path(cfg.train.run_dir) / JOURNAL
    if not journal.exists():
        return
    data = _read_journal(journal)
    if data["state"] == "moved" and complete_checkpoints(checkpoint_root(cfg)):
        forget_previous_run(cfg)
    else:
        _restore_previous_run(journal, data["moves"])


def forget_previous_run(cfg) -> None:
    """After a checkpoint of this run is written (rank 0): remove what train.overwrite set aside, if anything."""
    journal = Path(cfg.train.run_dir) / JOURNAL
    if not journal.exists():
        return
    data = _read_journal(journal)
    for _, dst in data["moves"]:
        p = Path(dst)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for aside in {Path(dst).parent for _, dst in data["moves"]}:
        with contextlib.suppress(OSError):
            aside.rmdir()
    journal.unlink()
    print("train.overwrite=true: this run's first checkpoint is written; removed the previous run", flush=True)


def check_fresh_launch(cfg, resume: bool) -> None:
    """A launch without --resume into a run dir with checkpoints: RunDirError, or with train.overwrite the old
    run is set aside (`_set_aside`)."""
    from megatron_rence.megatron.checkpoint import complete_checkpoints

    if resume:
        return
    root, run_dir = checkpoint_root(cfg), Path(cfg.train.run_dir)
    found = complete_checkpoints(root)
    if not found:
        return
    if not cfg.train.overwrite:
        raise RunDirError(f"run dir {run_dir} already holds a run: {len(found)} checkpoint(s) in {root} (the newest "
                          f"at step {found[-1][0]}). Pass --resume to continue it, choose another train.run_dir, "
                          f"or set train.overwrite=true to replace it")
    problem = load_inside_replaced_run(cfg)
    if problem:
        raise RunDirError(f"checkpoint.load: {problem}")
    _set_aside(cfg, _previous_run_entries(cfg))


# ----------------------------------------------------------------------------------------------- claim
def check_writable(directory: Path, key: str) -> None:
    """Create `directory` and write / remove a probe file; RunDirError naming the path, the key and the cause."""
    probe = Path(directory) / f".write_probe.{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise RunDirError(f"{key}: {directory} is not writable: {cause.lower()} "
                          f"({exc.filename or directory})") from exc


def _same_dir(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def claim_run_dir(cfg, resume: bool, rank: Optional[int] = None) -> Iterator[Optional[list[DirLock]]]:
    """On rank 0: lock the run dir and the checkpoint dir, finish an interrupted overwrite, refuse to clobber a
    previous run (or set it aside with train.overwrite); yields the locks. Leaving the block before this run's
    first checkpoint (an error, Ctrl-C) moves a set-aside run back."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        yield None
        return
    run_dir, root = Path(cfg.train.run_dir), checkpoint_root(cfg)
    owner = {"run_dir": os.path.abspath(run_dir)}
    check_writable(run_dir, "train.run_dir")
    locks: list[DirLock] = []
    try:
        locks.append(DirLock(run_dir, "run dir", "train.run_dir", owner))
        locks[-1].acquire()
        check_writable(root, "checkpoint.dir")
        if not _same_dir(root, run_dir):
            locks.append(DirLock(root, "checkpoint dir", "checkpoint.dir", owner))
            locks[-1].acquire()
        recover_previous_run(cfg)
        check_fresh_launch(cfg, resume)
        yield locks
    finally:
        try:
            if locks and all(lock.held for lock in locks):
                recover_previous_run(cfg)  # stopped before this run's first checkpoint: the old run comes back
        except (OSError, RunDirError) as exc:
            print(f"warning: could not move the previous run back: {exc}; the next launch retries", flush=True)
        finally:
            for lock in reversed(locks):
                lock.release()
