"""Grading worker process: `python -m megatron_rence.rewards.worker READ_FD WRITE_FD PARENT_PID` (RewardPool starts it).

A plain subprocess (not a multiprocessing child) so that it never re-imports the trainer's main module
(torch, megatron) and starts in the time it takes to import math-verify. Protocol over two pipes of
pickled messages: the parent sends ``(grade_fn, fallbacks, timeout_s)`` once, then ``(index, response,
answer)`` per item and ``None`` to stop; the worker answers ``("ready", None)`` once, then
``(index, GradeResult)`` per item.

Stop signals (SIGTERM / SIGUSR1 / SIGINT sent to the whole job) are ignored: the pool stops its workers
(lifecycle.py); a worker dies with the trainer (PR_SET_PDEATHSIG), even one stuck in a C-level loop.
"""
from __future__ import annotations

import logging
import sys
from multiprocessing.connection import Connection

from megatron_rence.lifecycle import become_child
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


def main() -> None:
    become_child(int(sys.argv[3]) if len(sys.argv) > 3 else None)  # the stop signals are the parent's business
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # statuses are reported to the parent
    read_fd, write_fd = int(sys.argv[1]), int(sys.argv[2])
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main()
