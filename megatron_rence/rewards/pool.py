"""A pool of grading worker processes whose per-item deadlines are enforced by the parent.

    with RewardPool(cfg.reward) as pool:
        results = pool.grade(responses, answers)    # list[GradeResult], same order
        pool.metrics()                              # {"reward/num_timeout": ..., ...}

Each worker is a subprocess running `rewards/worker.py` (not a multiprocessing child, which would
re-import the trainer's main module with torch and megatron), holding one item at a time. The parent
waits on the workers' pipes with a deadline per item: a worker that overruns `reward.timeout_s` is killed
and replaced and the item scores `reward.incorrect` with status "timeout"; a worker that dies scores
"error" and is replaced (replacements start in the background; the deadline starts at dispatch). So a
pathological answer (a C-level big-integer power, a parser bug that loops) costs at most `timeout_s`,
never the run. `num_workers: 0` grades in-process, for debugging (no hard deadline).

Workers start with the stop signals blocked and then ignore them (lifecycle.py): a SIGTERM sent to the
whole job leaves them grading until the trainer's step ends and `close()` stops them; they die with it.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import time
import weakref
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

from megatron_rence.lifecycle import stop_signals_blocked
from megatron_rence.rewards import math as math_reward
from megatron_rence.rewards.math import GradeResult
from megatron_rence.rewards.worker import READY

GradeFn = Callable[[str, str, Sequence[str], Optional[float]], GradeResult]
STARTUP_TIMEOUT_S = 120.0  # a worker that cannot even import math-verify in this long is an environment error


@dataclasses.dataclass
class _Worker:
    process: subprocess.Popen
    inbox: Connection  # parent -> worker
    outbox: Connection  # worker -> parent; EOF when the worker dies
    ready: bool = False
    started_at: float = 0.0
    item: Optional[int] = None  # index being graded
    deadline: float = 0.0


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


class RewardPool:
    """Grade (response, answer) pairs in worker processes; see the module docstring."""

    def __init__(self, reward_cfg, grade_fn: Optional[GradeFn] = None):
        """`grade_fn` (a picklable module-level function) replaces `rewards.math.grade`, e.g. in tests."""
        if reward_cfg.num_workers < 0:
            raise ValueError(f"reward.num_workers: must be >= 0, got {reward_cfg.num_workers}")
        if reward_cfg.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s: must be > 0, got {reward_cfg.timeout_s}")
        self.cfg = reward_cfg
        self._grade_fn: GradeFn = grade_fn or math_reward.grade
        self._fallbacks = list(reward_cfg.fallbacks)
        self._counts: collections.Counter = collections.Counter()
        self._last_seconds = 0.0
        self._workers: list[_Worker] = [self._start_worker() for _ in range(reward_cfg.num_workers)]
        weakref.finalize(self, _kill_all, self._workers)  # an unclosed pool does not leave workers behind

    # ---- public API ----
    def grade(self, responses: Sequence[str | bytes], answers: Sequence[str]) -> list[GradeResult]:
        """One GradeResult per pair, in order; rewards are `reward.correct` / `reward.incorrect`. Repeated pairs
        are graded once and share the result (a timeout too); the counts in `metrics()` are per pair."""
        if len(responses) != len(answers):
            raise ValueError(f"RewardPool.grade: {len(responses)} responses but {len(answers)} answers")
        start = time.monotonic()
        # Grading is a pure function of (response, answer): each distinct pair is graded once (a group's K
        # samples of a short answer often repeat; the CPU demo's 256 responses a step hold ~40 distinct ones).
        distinct: dict = {}
        slots = [distinct.setdefault((r, a), len(distinct)) for r, a in zip(responses, answers)]
        unique_responses, unique_answers = [r for r, _ in distinct], [a for _, a in distinct]
        if self._workers:
            graded = self._grade_in_workers(unique_responses, unique_answers)
        else:
            graded = [self._grade_here(r, a) for r, a in zip(unique_responses, unique_answers)]
        raw = [graded[slot] for slot in slots]
        results = [dataclasses.replace(r, reward=self.cfg.correct if r.reward > 0 else self.cfg.incorrect)
                   for r in raw]
        self._last_seconds = time.monotonic() - start
        self._counts["num_graded"] += len(results)
        for r in results:
            self._counts[f"num_{r.status}"] += 1
            self._counts["num_correct"] += r.reward == self.cfg.correct
        return results

    def metrics(self) -> dict:
        """Cumulative counts (`reward/num_graded`, `num_correct`, `num_ok`, `num_no_answer`, `num_timeout`,
        `num_error`, `num_worker_restarts`) and the last call's `reward/grade_s`."""
        keys = ["num_graded", "num_correct", "num_ok", "num_no_answer", "num_timeout", "num_error",
                "num_worker_restarts"]
        out = {f"reward/{k}": self._counts[k] for k in keys}
        out["reward/grade_s"] = self._last_seconds
        return out

    def close(self) -> None:
        for worker in self._workers:
            self._stop_worker(worker, graceful=True)
        self._workers.clear()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ----
    def _grade_here(self, response, answer) -> GradeResult:
        try:
            return self._grade_fn(response, answer, self._fallbacks, self.cfg.timeout_s)
        except Exception as exc:
            return GradeResult(0.0, None, "error", f"{type(exc).__name__}: {exc}"[:200])

    def _start_worker(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # The child needs this interpreter's import path to unpickle `grade_fn` (e.g. a test module's function).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with stop_signals_blocked():
            process = subprocess.Popen(
                [sys.executable, "-m", "megatron_rence.rewards.worker", str(to_child_r), str(from_child_w),
                 str(os.getpid())], pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        worker = _Worker(process, Connection(to_child_w, readable=False), Connection(from_child_r, writable=False),
                         started_at=time.monotonic())
        worker.inbox.send((self._grade_fn, self._fallbacks, self.cfg.timeout_s))
        return worker

    def _stop_worker(self, worker: _Worker, graceful: bool) -> None:
        if graceful and worker.process.poll() is None:
            try:
                worker.inbox.send(None)
                worker.process.wait(timeout=1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait()
        worker.inbox.close()
        worker.outbox.close()

    def _replace(self, worker: _Worker) -> _Worker:
        self._stop_worker(worker, graceful=False)
        self._counts["num_worker_restarts"] += 1
        fresh = self._start_worker()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def _grade_in_workers(self, responses, answers) -> list[GradeResult]:
        results: list[Optional[GradeResult]] = [None] * len(responses)
        pending = collections.deque(range(len(responses)))
        while pending or any(w.item is not None for w in self._workers):
            for worker in list(self._workers):
                if worker.ready and worker.item is None and pending:
                    self._dispatch(worker, pending, responses, answers)
            self._wait_and_collect(results)
        assert all(r is not None for r in results)
        return results

    def _dispatch(self, worker: _Worker, pending, responses, answers) -> None:
        index = pending.popleft()
        try:
            worker.inbox.send((index, responses[index], answers[index]))
        except OSError:  # died while idle: replace it, the item goes to the next free worker
            pending.appendleft(index)
            self._replace(worker)
            return
        worker.item, worker.deadline = index, time.monotonic() + self.cfg.timeout_s

    def _wait_and_collect(self, results: list) -> None:
        now = time.monotonic()
        deadlines = [w.deadline if w.item is not None else w.started_at + STARTUP_TIMEOUT_S
                     for w in self._workers if w.item is not None or not w.ready]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        readable = set(wait([w.outbox for w in self._workers], timeout=timeout))
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.outbox in readable:
                self._receive(worker, results)
            elif worker.item is not None and now >= worker.deadline:
                results[worker.item] = GradeResult(0.0, None, "timeout", f"killed after {self.cfg.timeout_s}s")
                self._replace(worker)
            elif not worker.ready and now >= worker.started_at + STARTUP_TIMEOUT_S:
                raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT_S}s")

    def _receive(self, worker: _Worker, results: list) -> None:
        try:
            index, result = worker.outbox.recv()
        except (EOFError, OSError):  # the worker died
            self._on_death(worker, results)
            return
        if index == READY:
            worker.ready = True
            return
        assert index == worker.item, (index, worker.item)
        results[index] = result
        worker.item = None

    def _on_death(self, worker: _Worker, results: list) -> None:
        code = worker.process.wait()
        if worker.item is not None:
            results[worker.item] = GradeResult(0.0, None, "error", f"worker died (exit code {code})")
        elif not worker.ready:
            raise RuntimeError(f"reward worker exited during startup (exit code {code}); see its stderr above")
        self._replace(worker)
