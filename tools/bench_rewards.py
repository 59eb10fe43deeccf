"""Verifications per second of the reward pool on a mix of realistic responses (in-process, 1 and 2 workers).

    python tools/bench_rewards.py [--items 800] [--workers 0 1 2]
"""
from __future__ import annotations

import argparse
import random
import time

from megatron_rence.config import RewardConfig
from megatron_rence.rewards.pool import RewardPool

_REASONING = ("Let me think step by step. First we compute the sum of the terms, then we simplify "
              "the expression and check the boundary cases carefully. ") * 12


def response_mix(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` (response, answer) pairs: long chains of thought ending in integers, fractions, radicals, sets,
    intervals; wrong answers; unboxed answers; a few with no answer at all. Answers vary per item so that
    caching the reference parse only helps as much as it does in training (K samples per prompt)."""
    rng = random.Random(seed)
    responses, answers = [], []
    for _ in range(n):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        kind = rng.choice(["int", "int_wrong", "frac", "frac_decimal", "sqrt", "set", "interval",
                           "unboxed", "none", "expr"])
        answer, final = {
            "int": (str(a * b), f"\\boxed{{{a * b}}}"),
            "int_wrong": (str(a * b), f"\\boxed{{{a * b + 1}}}"),
            "frac": (f"\\frac{{{a}}}{{{b}}}", f"\\boxed{{\\dfrac{{{2 * a}}}{{{2 * b}}}}}"),
            "frac_decimal": ("\\frac{1}{4}", "\\boxed{0.25}"),
            "sqrt": (f"{a}\\sqrt{{2}}", f"\\boxed{{\\sqrt{{{2 * a * a}}}}}"),
            "set": (f"\\{{{a}, {b}\\}}", f"\\boxed{{\\{{{b}, {a}\\}}}}"),
            "interval": (f"({a}, {a + b}]", f"\\boxed{{({a},{a + b}]}}"),
            "unboxed": (str(a + b), f"So the total is {a + b}."),
            "none": (str(a), "I am not sure how to finish this."),
            "expr": (f"{a}x + {b}", f"\\boxed{{{b} + {a}x}}"),
        }[kind]
        responses.append(_REASONING + final)
        answers.append(answer)
    return responses, answers


def bench(num_workers: int, responses: list[str], answers: list[str]) -> tuple[float, dict]:
    cfg = RewardConfig(num_workers=num_workers, timeout_s=5.0, fallbacks=["last_number"])
    with RewardPool(cfg) as pool:
        pool.grade(responses[:8], answers[:8])  # workers started and warm
        start = time.perf_counter()
        results = pool.grade(responses, answers)
        elapsed = time.perf_counter() - start
        metrics = pool.metrics()
    correct = sum(r.reward > 0 for r in results)
    return len(responses) / elapsed, {"correct": correct, "timeout": metrics["reward/num_timeout"],
                                      "error": metrics["reward/num_error"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    responses, answers = response_mix(args.items)
    print(f"{args.items} responses, ~{sum(map(len, responses)) // args.items} characters each")
    for n in args.workers:
        rate, info = bench(n, responses, answers)
        label = "in-process" if n == 0 else f"{n} worker{'s' if n > 1 else ''}"
        print(f"{label:>12}: {rate:8.1f} verifications/s  (correct {info['correct']}, "
              f"timeout {info['timeout']}, error {info['error']})")


if __name__ == "__main__":
    main()
