"""One run per run dir: a lock file, a fresh launch that never clobbers a finished run, a writable checkpoint dir.

    with claim_run_dir(cfg, resume):   # rank 0 holds <run_dir>/.lock until the block exits
        ...train...

The lock is ``<run_dir>/.lock`` (JSON: pid, host, start time), created with O_EXCL. It is released when the
block exits and, as a fallback, at interpreter exit; a lock whose holder is a dead process on this host is
stale and taken over, and so is one left by an earlier incarnation of this Slurm job (same SLURM_JOB_ID,
another SLURM_RESTART_COUNT: a requeued job that was killed before it could release it). A live holder on
another host cannot be checked: the error says which host to look at.
A fresh launch (no ``--resume``) into a run dir that already holds checkpoints is refused unless
``train.overwrite=true``, which removes the old run's checkpoints, metrics.jsonl and TensorBoard events.
Only rank 0 (env RANK) touches the file system here; the other ranks return at once.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

LOCK = ".lock"


class RunDirError(RuntimeError):
    """The run dir is in use by another run, holds a run that a fresh launch would overwrite, or is not writable."""


def checkpoint_root(cfg) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.train.run_dir) / "checkpoints")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _slurm_job() -> dict:
    """This process's Slurm job id and restart count ({} outside Slurm); a requeued job keeps its id."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"],
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


class RunDirLock:
    """An O_EXCL lock file naming its holder; `release` removes it (only if it is still ours)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              **_slurm_job()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            self.held = True
            atexit.register(self.release)
            return
        raise RunDirError(f"could not create the lock file {self.path} (another run keeps taking it)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError):
            if time.time() - self.path.stat().st_mtime < 2:  # probably being written by its creator right now
                time.sleep(1)
                return
            print(f"warning: {self.path} is unreadable (a torn write?); taking it over", flush=True)
            self.path.unlink(missing_ok=True)
            return
        job = _slurm_job()
        if job and job["slurm_job_id"] == holder.get("slurm_job_id") \
                and job["slurm_restart_count"] != holder.get("slurm_restart_count"):
            print(f"warning: taking over the lock {self.path} of an earlier run of Slurm job "
                  f"{holder['slurm_job_id']} (pid {pid} on {host}, restart {holder.get('slurm_restart_count')})",
                  flush=True)
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _pid_alive(pid):
            print(f"warning: removing the stale lock {self.path} of pid {pid} on {host} (that process is gone)",
                  flush=True)
            self.path.unlink(missing_ok=True)
            return
        where = "this host" if host == socket.gethostname() else f"host {host}"
        raise RunDirError(f"run dir {self.path.parent} is in use by pid {pid} on {host} (since "
                          f"{holder.get('started', '?')}; lock file {self.path}); wait for that run, or choose "
                          f"another train.run_dir. If pid {pid} on {where} is gone, delete {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def check_fresh_launch(cfg, resume: bool) -> None:
    """A launch without --resume into a run dir with checkpoints: RunDirError, or with train.overwrite the
    old run's checkpoints, metrics.jsonl and TensorBoard events are removed."""
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
    print(f"train.overwrite=true: removing the previous run's checkpoints in {root} and its metrics", flush=True)
    for _, path in found:
        shutil.rmtree(path)
    (root / "latest").unlink(missing_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)


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


@contextlib.contextmanager
def claim_run_dir(cfg, resume: bool, rank: Optional[int] = None) -> Iterator[Optional[RunDirLock]]:
    """On rank 0: lock the run dir, refuse to clobber a previous run, check the checkpoint dir is writable."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if rank != 0:
        yield None
        return
    check_writable(Path(cfg.train.run_dir), "train.run_dir")
    lock = RunDirLock(Path(cfg.train.run_dir))
    lock.acquire()
    try:
        check_fresh_launch(cfg, resume)
        check_writable(checkpoint_root(cfg), "checkpoint.dir")
        yield lock
    finally:
        lock.release()
