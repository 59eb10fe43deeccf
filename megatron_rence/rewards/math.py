"""Math answer grading: extract the final answer, then compare it with the reference using math-verify.

`grade` is pure and runs in-process. math-verify bounds its own parsing and comparison with
`signal.alarm`, which only works in a process's main thread; off the main thread `grade` runs without
those inner timeouts, so callers that need a hard bound use `rewards.pool.RewardPool` (worker processes,
deadlines enforced by the parent).

What math-verify accepts as equal (checked in tests/unit/test_rewards_math.py): ``\\frac12`` = 0.5;
``50\\%`` = 0.5 and also = 50 (percentages are lenient); ``\\{1,2\\}`` = ``\\{2,1\\}`` and "1,2" = "2,1"
(sets); ``(1,2]`` = ``(1, 2]`` but ``[1,2]`` != ``(1,2)`` (intervals); ``x=3`` = 3 (either side);
"1,000" = 1000; ``2\\sqrt{2}`` = ``\\sqrt{8}``.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from megatron_rence.rewards.extract import answer_and_source, last_boxed

Status = Literal["ok", "no_answer", "timeout", "error"]
MAX_ANSWER_CHARS = 1000  # a longer "final answer" is not an answer; grading it could take seconds


@dataclass(frozen=True)
class GradeResult:
    """`reward` 1.0 (correct) or 0.0; `status` "ok" whenever the comparison ran to completion; `source` where
    the extracted answer came from: "boxed", a fallback's name ("last_number", "answer_is") or None."""

    reward: float
    extracted: Optional[str]
    status: Status
    detail: str = ""
    source: Optional[str] = None

    @property
    def used_fallback(self) -> bool:
        """The answer was graded although the response has no \\boxed{} (reward.fallbacks found it)."""
        return self.source not in (None, "boxed")


def _as_text(value: str | bytes) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def normalize_reference(answer: str) -> str:
    """Reference answers sometimes come boxed or wrapped in $...$; keep the content only."""
    answer = answer.strip()
    boxed = last_boxed(answer)
    if boxed is not None:
        answer = boxed
    return answer.strip().strip("$").strip()


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str, timeout: Optional[int]) -> tuple:
    # A rollout batch grades K responses against the same reference: parse it once per worker.
    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=timeout, raise_on_error=True))


def _inner_timeout(timeout_s: Optional[float]) -> Optional[int]:
    """math-verify's per-call alarm (whole seconds), or None where signals cannot be used."""
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(timeout_s / 3))  # three guarded calls: reference parse, response parse, comparison


def grade(response: str | bytes, answer: str | bytes, fallbacks: Sequence[str] = ("last_number",),
          timeout_s: Optional[float] = 5.0) -> GradeResult:
    """Grade one response against the reference answer.

    The response's answer is its last ``\\boxed{}`` / ``\\fbox{}``, else the first of `fallbacks`
    ("last_number", "answer_is") that finds one. Bytes are decoded as UTF-8 with replacement.
    """
    response, answer = _as_text(response), normalize_reference(_as_text(answer))
    extracted, source = answer_and_source(response, fallbacks)
    if extracted is None or not extracted.strip():
        return GradeResult(0.0, extracted, "no_answer")
    if len(extracted) > MAX_ANSWER_CHARS:
        return GradeResult(0.0, extracted[:100], "error", f"answer longer than {MAX_ANSWER_CHARS} characters", source)
    if extracted.strip() == answer:
        return GradeResult(1.0, extracted, "ok", source=source)
    timeout = _inner_timeout(timeout_s)
    try:
        gold = _parse_reference(answer, timeout)
        target = parse("\\boxed{" + extracted + "}", parsing_timeout=timeout, raise_on_error=True)
    except TimeoutException:
        return GradeResult(0.0, extracted, "timeout", "parsing timed out", source)
    except Exception as exc:  # math-verify / sympy / antlr raise anything on odd input
        return GradeResult(0.0, extracted, "error", f"parse: {type(exc).__name__}: {exc}"[:200], source)
    return dataclasses.replace(_compare(list(gold), target, extracted, timeout), source=source)


def _compare(gold: list, target: list, extracted: str, timeout: Optional[int]) -> GradeResult:
    """Correct if any (reference, response) parse pair verifies; otherwise say why nothing did."""
    failure: Optional[GradeResult] = None
    for g, t in itertools.product(gold, target):
        try:
            if verify(g, t, timeout_seconds=timeout, raise_on_error=True):
                return GradeResult(1.0, extracted, "ok")
        except TimeoutException:
            failure = GradeResult(0.0, extracted, "timeout", "comparison timed out")
        except Exception as exc:
            failure = failure or GradeResult(0.0, extracted, "error", f"verify: {type(exc).__name__}: {exc}"[:200])
    return failure or GradeResult(0.0, extracted, "ok")


def fallback_fractions(grades: Sequence[GradeResult], positive_threshold: float = 0.5) -> dict[str, float]:
    """How much of the grading leaned on `reward.fallbacks` instead of a \\boxed{} answer.

    `fallback_frac`: of the responses with an extracted answer, the share found by a fallback;
    `correct_fallback_frac`: of the correct responses (reward >= threshold), the share found by a fallback.
    Both 0.0 when there is nothing to count.

    >>> r = [GradeResult(1.0, "7", "ok", source="last_number"), GradeResult(1.0, "7", "ok", source="boxed"),
    ...      GradeResult(0.0, "8", "ok", source="last_number"), GradeResult(0.0, None, "no_answer")]
    >>> fallback_fractions(r)
    {'fallback_frac': 0.6666666666666666, 'correct_fallback_frac': 0.5}
    """
    answered = [g for g in grades if g.source is not None]
    correct = [g for g in answered if g.reward >= positive_threshold]
    return {"fallback_frac": sum(g.used_fallback for g in answered) / max(len(answered), 1),
            "correct_fallback_frac": sum(g.used_fallback for g in correct) / max(len(correct), 1)}
