"""An exclusive lock on a directory: ``<dir>/.lock`` held with ``flock`` for the life of the process.

    lock = DirLock(run_dir, "run dir", "train.run_dir", owner={"run_dir": ...})
    lock.acquire()          # RunDirError naming the holder (pid, host, start, its run dir) when it is taken
    ...
    lock.release()          # also at interpreter exit; the kernel releases it when the process dies

Who holds the lock is decided by the kernel, never by the file's contents: `acquire` opens the file and asks
for a non-blocking exclusive ``flock``. A holder that died (crash, ``kill -9``, a node whose job was killed)
released it with its last file descriptor, so taking over a stale lock is the same single atomic call as
taking a free one: there is no read / check pid / unlink / create window in which two launches can both
win, a pid reused by another program cannot keep a dead run's lock, and a torn or empty file is harmless.
The JSON in the file (pid, host, start, run dir, Slurm job) only names the holder in the error message.

`release` unlinks the file while still holding the lock, then closes it. A launch that opened the old file
just before the unlink gets its lock on an inode that no longer has that name; it sees the mismatch
(``fstat`` vs ``stat``) and starts over on the new file. Forked children close their copy of the descriptor
(the parent keeps the lock; a child never releases it), exec'd ones never get it (O_CLOEXEC).

A requeued Slurm job (same SLURM_JOB_ID, another SLURM_RESTART_COUNT) may find its earlier incarnation's
lock still held for a moment (a network file system releases a dead node's locks when its lease expires):
it waits up to `SLURM_TAKEOVER_WAIT_S` for it. File systems without ``flock`` (Lustre mounted without
``-o flock``) are refused with a message: a lock that does not exclude is worse than none.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

LOCK = ".lock"
SLURM_TAKEOVER_WAIT_S = 120.0  # a network file system's lock lease (NFSv4: 90 s) plus margin
_HELD: list["DirLock"] = []


class RunDirError(RuntimeError):
    """The run dir is in use by another run, holds a run that a fresh launch would overwrite, or is not writable."""


def _close_in_child() -> None:
    """After fork, in the child: drop our descriptors of held locks (the parent still holds them)."""
    for lock in _HELD:
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _slurm_job() -> dict:
    """This process's Slurm job id and restart count ({} outside Slurm); a requeued job keeps its id."""
    if "SLURM_JOB_ID" not in os.environ:
        return {}
    return {"slurm_job_id": os.environ["SLURM_JOB_ID"],
            "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0")}


def _read_holder(fd_or_path) -> Optional[dict]:
    """The JSON a holder wrote into the lock file; None when empty, torn or not a mapping."""
    try:
        if isinstance(fd_or_path, int):
            text = os.pread(fd_or_path, 1 << 16, 0).decode(errors="replace")
        else:
            text = Path(fd_or_path).read_text(errors="replace")
        holder = json.loads(text)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _describe(holder: Optional[dict]) -> str:
    if holder is None:
        return "another process (its lock file is empty or unreadable: being written right now?)"
    text = f"pid {holder.get('pid')} on {holder.get('host', '?')} (since {holder.get('started', '?')}"
    if holder.get("run_dir"):
        text += f"; run dir {holder['run_dir']}"
    return text + ")"


class DirLock:
    """``<directory>/.lock``, exclusive across processes and hosts that share the file system (see the module)."""

    def __init__(self, directory: Path, role: str, key: str, owner: Optional[dict] = None):
        self.path = Path(directory) / LOCK
        self.role, self.key, self.owner = role, key, dict(owner or {})
        self._fd: Optional[int] = None
        self._pid = 0

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited_since = None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = _read_holder(self.path)
                if self._may_wait_for(holder, waited_since):
                    waited_since = waited_since or time.monotonic()
                    time.sleep(1.0)
                    continue
                raise RunDirError(self._busy_message(holder)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise RunDirError(f"{self.key}: cannot lock {self.path}: the file system does not support "
                                      f"flock ({os.strerror(exc.errno).lower()}); mount it with flock support "
                                      f"(Lustre: -o flock) or use another directory") from exc
                raise
            if self._is_current(fd):
                self._take(fd)
                return
            os.close(fd)  # released and unlinked between our open and our flock: try the new file

    def _is_current(self, fd: int) -> bool:
        try:
            now, mine = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _take(self, fd: int) -> None:
        previous = _read_holder(fd)
        if previous is not None:
            print(f"note: {self.path}: taking over the lock left by {_describe(previous)}: that process no longer "
                  f"holds it", flush=True)
        elif os.fstat(fd).st_size:
            print(f"note: {self.path}: taking over an unreadable lock file (torn by a crash); nobody holds it",
                  flush=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              **self.owner, **_slurm_job()}
        data = json.dumps(me).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd, self._pid = fd, os.getpid()
        _HELD.append(self)
        atexit.register(self.release)

    def _may_wait_for(self, holder: Optional[dict], waited_since: Optional[float]) -> bool:
        """An earlier run of this Slurm job (requeued): wait a while for its lock to be released."""
        job = _slurm_job()
        if not (job and holder and job["slurm_job_id"] == holder.get("slurm_job_id")
                and job["slurm_restart_count"] != holder.get("slurm_restart_count")):
            return False
        if waited_since is None:
            print(f"note: {self.path} is still held by an earlier run of Slurm job {job['slurm_job_id']} "
                  f"({_describe(holder)}); waiting up to {SLURM_TAKEOVER_WAIT_S:.0f} s for it to be released",
                  flush=True)
            return True
        return time.monotonic() - waited_since < SLURM_TAKEOVER_WAIT_S

    def _busy_message(self, holder: Optional[dict]) -> str:
        return (f"{self.role} {self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); wait "
                f"for that run, or choose another {self.key}. The lock is held by a live process (the kernel "
                f"releases it when its holder dies); if that process is on a node that crashed and the file "
                f"server still holds its lock, delete {self.path}")

    def release(self) -> None:
        """Unlink the file (if it is still ours) and close it, which releases the lock. Only the acquirer."""
        if not self.held:
            return
        fd, self._fd = self._fd, None
        try:
            if self._is_current(fd):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)
            if self in _HELD:
                _HELD.remove(self)
