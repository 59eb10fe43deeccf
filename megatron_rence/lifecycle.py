"""Stop signals and child processes: the trainer stops on them, the processes it starts do not.

Slurm (scancel, srun, an sbatch trap forwarding the signal) and `kill -TERM -- -PGID` signal every process
of a job, children included. The trainer checkpoints and exits on SIGTERM / SIGUSR1 / SIGINT
(train.StopFlag); each process it starts (reward workers, checkpoint writer workers, the SGLang engine's
scheduler / detokenizer) must outlive that signal until its owner shuts it down, and must die with the
trainer when the trainer is killed outright (kill -9, the OOM killer), so nothing is left behind:

- exec'd children are created inside `stop_signals_blocked()`: the stop signals are blocked in the calling
  thread while they start; a child inherits the blocked mask through fork and exec, so a signal that
  arrives before it is ready stays pending instead of killing it. Our own children (rewards/worker.py)
  then call `become_child(parent_pid)`: ignore the stop signals, unblock them, die with the parent.
  SGLang's processes keep them blocked (pending for ever, i.e. ignored) and already die with their
  parent (SGLang's own `kill_itself_when_parent_died`).
- forked children (megatron's checkpoint writer workers) run the same through `os.register_at_fork`
  while the fork hook is on: `install_fork_hook()` turns it on (train.StopFlag does, for the run),
  `remove_fork_hook()` off again, so a process that goes on after a run (a test, a notebook) forks and
  spawns with its own signal handling.

The parent loses no signal: while its main thread blocks them they go to another thread (the Python
handler still runs in the main thread), or stay pending until the block ends.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_prctl():
    """libc's prctl on Linux, else None; resolved once in the parent (a forked child must not dlopen)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_fork_hook_registered = False
_fork_hook_on = False


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block SIGTERM / SIGUSR1 / SIGINT in this thread for the duration; processes started inside inherit it.

    multiprocessing's resource tracker is started first (start_resource_tracker): CPython (3.11, 3.12) starts it
    on the first spawn and, while doing so, UNBLOCKS SIGINT / SIGTERM in the calling thread
    (resource_tracker.ensure_running blocks them around its own spawn, then SIG_UNBLOCKs them instead of
    restoring the previous mask). Started inside our block it would leave every later child (SGLang's
    scheduler and detokenizer, when the engine is the first spawn) with only SIGUSR1 blocked: a job-wide
    SIGTERM would kill the engine before the trainer checkpoints.
    """
    start_resource_tracker()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, if not yet running (POSIX; idempotent).

    Started with the stop signals blocked: the tracker ignores SIGINT / SIGTERM itself but would die on
    a job-wide SIGUSR1 (Slurm's --signal=USR1); it inherits the blocked SIGUSR1. This thread's mask is
    restored afterwards (ensure_running unblocks SIGINT / SIGTERM in it)."""
    if os.name != "posix":
        return
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def die_with_parent(parent_pid: int) -> None:
    """This process gets SIGKILL when `parent_pid` (its parent) exits: prctl(PR_SET_PDEATHSIG) on Linux, a
    thread watching getppid() elsewhere. Exits at once if the parent is already gone.

    Linux sends the signal when the parent *thread* that created this process exits: owners create their
    children from the main thread."""
    if _prctl is not None and _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # the parent died before the prctl
            os._exit(1)
        return
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    os._exit(1)


def become_child(parent_pid: Optional[int] = None) -> None:
    """Ignore the stop signals (the owner shuts this process down), unblock them, die with the parent."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # pending ones are discarded: they are ignored
    die_with_parent(os.getppid() if parent_pid is None else parent_pid)


_mask_before_fork: Optional[set] = None  # None: the hook was off when this fork started
_pid_before_fork = 0


def _before_fork() -> None:
    """The stop signals stay blocked across the fork, so the child starts with them blocked: one sent to it
    before `_after_fork_in_child` has run stays pending and is discarded once ignored (without this a SIGTERM
    right after the fork killed the child: the hook runs only when the child is first scheduled)."""
    global _mask_before_fork, _pid_before_fork
    if not _fork_hook_on:
        _mask_before_fork = None
        return
    _pid_before_fork = os.getpid()
    _mask_before_fork = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _after_fork_in_parent() -> None:
    if _mask_before_fork is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)


def _after_fork_in_child() -> None:
    if _mask_before_fork is None:
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if _prctl is not None:  # no thread here: a forked child of a threaded process must stay simple
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _pid_before_fork:  # the parent died before the prctl
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_SETMASK, _mask_before_fork)  # pending stop signals: ignored, dropped


def install_fork_hook() -> None:
    """Every process forked from this one from now on (until `remove_fork_hook`) ignores the stop signals and
    dies with it (megatron's checkpoint writer forks its workers from the trainer). Idempotent."""
    global _fork_hook_registered, _fork_hook_on
    if not _fork_hook_registered:  # os.register_at_fork cannot be undone: the hooks check _fork_hook_on
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        _fork_hook_registered = True
    _fork_hook_on = True


def remove_fork_hook() -> None:
    """Forks from now on are plain again (the run is over). Idempotent."""
    global _fork_hook_on
    _fork_hook_on = False


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X"):
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
