"""Grading worker process: `python -m megatron_rence.rewards.worker READ_FD WRITE_FD`, started by RewardPool.

A plain subprocess (not a multiprocessing child) so that it never re-imports the trainer's main module
(torch, megatron) and starts in the time it takes to import math-verify. Protocol over two pipes of
pickled messages: the parent sends ``(grade_fn, fallbacks, timeout_s)`` once, then ``(index, response,
answer)`` per item and ``None`` to stop; the worker answers ``("ready", None)`` once, then
``(index, GradeResult)`` per item.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from megatron_rence.rewards.math import GradeResult

READY = "ready"


def serve(inbox: Connection, outbox: Connection) -> None:
    grade_fn, fallbacks, timeout_s = inbox.recv()
    outbox.send((READY, None))
    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, response, answer = message
        try:
            result = grade_fn(response, answer, fallbacks, timeout_s)
        except Exception as exc:  # anything a grader raises scores 0 with status "error"
            result = GradeResult(0.0, None, "error", f"{type(exc).__name__}: {exc}"[:200])
        outbox.send((index, result))


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker busy in Python code when the trainer dies still exits (a C-level loop holds the GIL)."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def main() -> None:
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # statuses are reported to the parent
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main()
