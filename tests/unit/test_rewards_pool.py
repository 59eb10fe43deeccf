"""RewardPool: real grading in worker processes, parent-enforced timeouts, crashed workers replaced.

The hanging / crashing graders below are test-only stand-ins injected through `grade_fn` to simulate what
a real pathological input can do to math-verify (a C-level loop that no signal interrupts, a segfault).
"""
import os
import time

import pytest

from megatron_rence.config import RewardConfig
from megatron_rence.rewards.math import GradeResult, grade
from megatron_rence.rewards.pool import RewardPool


def misbehaving_grade(response, answer, fallbacks, timeout_s):
    """Test-only grader: "HANG" busy-loops forever, "CRASH" kills the process, "RAISE" raises."""
    if response == "HANG":
        while True:
            pass
    if response == "CRASH":
        os._exit(3)
    if response == "RAISE":
        raise RuntimeError("boom")
    return grade(response, answer, fallbacks, timeout_s)


BAD_INPUTS = [
    ("", "5"),
    ("I give up", "5"),
    ("\\boxed{\\frac{1}{2}", "0.5"),
    ("\\boxed{" + "9" * 100_000 + "}", "9"),
    ("\\boxed{10^{10^{10}}}", "1"),
    (b"\xff\xfe \\boxed{7}", "7"),
    ("\\boxed{\\frac{1}{0}}", "1"),
    ("\\boxed{\\frac12}", "0.5"),
]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(RewardConfig(num_workers=2, timeout_s=3.0, fallbacks=["answer_is"])) as p:
        yield p


def test_pool_matches_in_process_grading(pool):
    responses = [r for r, _ in BAD_INPUTS] + ["The answer is 12.", "\\boxed{13}"]
    answers = [a for _, a in BAD_INPUTS] + ["12", "12"]
    results = pool.grade(responses, answers)
    expected = [grade(r, a, ["answer_is"], 3.0) for r, a in zip(responses, answers)]
    assert [(r.reward, r.status, r.extracted) for r in results] == [(e.reward, e.status, e.extracted)
                                                                    for e in expected]
    assert [r.reward for r in results] == [0, 0, 0, 0, 0, 1, 0, 1, 1, 0]
    assert results[4].status == "timeout"
    assert pool.grade([], []) == []
    metrics = pool.metrics()
    assert metrics["reward/num_graded"] >= 10 and metrics["reward/num_timeout"] >= 1


def test_pool_rejects_length_mismatch(pool):
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        pool.grade(["a", "b"], ["1"])


def test_hang_is_killed_crash_and_raise_are_replaced():
    cfg = RewardConfig(num_workers=2, timeout_s=1.5, fallbacks=["last_number"])
    with RewardPool(cfg, grade_fn=misbehaving_grade) as pool:
        pool.grade(["1"], ["1"])  # workers up
        start = time.monotonic()
        responses = ["HANG", "\\boxed{2}", "CRASH", "3", "RAISE", "HANG", "4", "CRASH", "5"]
        answers = ["1", "2", "1", "3", "1", "9", "4", "9", "6"]  # distinct pairs: repeats are graded once
        results = pool.grade(responses, answers)
        elapsed = time.monotonic() - start
        statuses = [r.status for r in results]
        assert statuses == ["timeout", "ok", "error", "ok", "error", "timeout", "ok", "error", "ok"]
        assert [r.reward for r in results] == [0, 1, 0, 1, 0, 0, 1, 0, 0]
        assert "exit code 3" in results[2].detail and "boom" in results[4].detail
        # two hangs on two workers overlap; each costs timeout_s plus a background restart
        assert elapsed < 2 * cfg.timeout_s + 20, elapsed
        metrics = pool.metrics()
        assert metrics["reward/num_worker_restarts"] == 4  # 2 hangs + 2 crashes; RAISE keeps its worker
        assert metrics["reward/num_timeout"] == 2 and metrics["reward/num_error"] == 3
        assert all(w.process.poll() is None for w in pool._workers)
        again = pool.grade(["7", "\\boxed{8}"], ["7", "8"])  # the replacements work
        assert [r.reward for r in again] == [1, 1]
        processes = [w.process for w in pool._workers]
    assert all(p.poll() is not None for p in processes)  # close() stopped every worker


def test_reward_values_from_config():
    cfg = RewardConfig(num_workers=0, correct=1.0, incorrect=-1.0)
    with RewardPool(cfg) as pool:
        results = pool.grade(["\\boxed{4}", "\\boxed{5}", ""], ["4", "4", "4"])
    assert [r.reward for r in results] == [1.0, -1.0, -1.0]
    assert [r.status for r in results] == ["ok", "ok", "no_answer"]


def test_in_process_mode_catches_exceptions():
    with RewardPool(RewardConfig(num_workers=0), grade_fn=misbehaving_grade) as pool:
        results = pool.grade(["RAISE", "2"], ["1", "2"])
        assert [(r.reward, r.status) for r in results] == [(0.0, "error"), (1.0, "ok")]
        assert pool.metrics()["reward/num_error"] == 1


@pytest.mark.parametrize("field,value", [("num_workers", -1), ("timeout_s", 0.0)])
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=f"reward.{field}"):
        RewardPool(RewardConfig(**{field: value}))


def test_grade_result_is_plain_data():
    assert GradeResult(1.0, "2", "ok") == GradeResult(1.0, "2", "ok", "")


GRADED = []


def counting_grade(response, answer, fallbacks, timeout_s):
    """Test-only grader: records each call, then grades for real."""
    GRADED.append((response, answer))
    return grade(response, answer, fallbacks, timeout_s)


def test_repeated_pairs_are_graded_once_and_counted_per_pair():
    """A group's samples of a short answer repeat: each distinct (response, answer) is graded once, every
    position gets its result, and the metrics count all pairs (4 correct of 6)."""
    GRADED.clear()
    responses = ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}", "\\boxed{4}", "\\boxed{5}"]
    answers = ["4", "4", "4", "5", "4", "5"]
    with RewardPool(RewardConfig(num_workers=0), grade_fn=counting_grade) as pool:
        results = pool.grade(responses, answers)
        metrics = pool.metrics()
    assert [r.reward for r in results] == [1, 0, 1, 0, 1, 1]
    assert GRADED == [("\\boxed{4}", "4"), ("\\boxed{5}", "4"), ("\\boxed{4}", "5"), ("\\boxed{5}", "5")]
    assert metrics["reward/num_graded"] == 6 and metrics["reward/num_correct"] == 4
