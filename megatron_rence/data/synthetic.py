"""The CPU recipes' verifiable tasks, generated from a seed: integer arithmetic ("3+5*2" -> "13", the demo) or
easy one-step word problems (`data.synthetic.kind: word_problems`, data/word_problems.py).

Train / held-out split (`data.synthetic.num_heldout` > 0): a problem belongs to the held-out side when the
sha256 of its text falls in one of HELDOUT_BUCKETS of 100 buckets, so the two sides never share a problem.
Training draws skip held-out problems; the benchmark format `synthetic` (eval.benchmarks) draws
`num_heldout` distinct held-out problems from the same generator with another seed stream.
"""
from __future__ import annotations

import hashlib
import random

from megatron_rence.data.word_problems import word_problem

SUPPORTED_OPERATORS = "+-*"


def evaluate_expression(terms: list[int], operators: list[str]) -> int:
    """Value of `terms[0] op[0] terms[1] ...` with the usual precedence (* before + and -)."""
    assert len(operators) == len(terms) - 1
    sums: list[int] = [terms[0]]  # running products, each with its sign folded in
    for op, value in zip(operators, terms[1:]):
        if op == "*":
            sums[-1] *= value
        elif op == "+":
            sums.append(value)
        elif op == "-":
            sums.append(-value)
        else:
            raise AssertionError(f"unsupported operator {op!r}")
    return sum(sums)


def check_task_config(task_cfg) -> None:
    """Raise ValueError naming the data.synthetic.* key that cannot describe a task."""
    if task_cfg.num_terms < 2:
        raise ValueError(f"data.synthetic.num_terms: must be >= 2, got {task_cfg.num_terms}")
    if task_cfg.min_value < 0 or task_cfg.max_value < task_cfg.min_value:
        raise ValueError(f"data.synthetic.min_value/max_value: need 0 <= min_value <= max_value, got "
                         f"{task_cfg.min_value}..{task_cfg.max_value}")
    bad = sorted(set(task_cfg.operators) - set(SUPPORTED_OPERATORS))
    if not task_cfg.operators or bad:
        raise ValueError(f"data.synthetic.operators: {task_cfg.operators!r} must be a non-empty string of "
                         f"{SUPPORTED_OPERATORS!r} (unsupported: {bad})")
    if task_cfg.num_problems < 1:
        raise ValueError(f"data.synthetic.num_problems: must be >= 1, got {task_cfg.num_problems}")
    if task_cfg.kind not in KINDS:
        raise ValueError(f"data.synthetic.kind: {task_cfg.kind!r} is not one of {list(KINDS)}")
    if task_cfg.kind == "word_problems" and task_cfg.num_terms != 2:
        raise ValueError(f"data.synthetic.num_terms: word problems are one-step (2 numbers), got {task_cfg.num_terms}")
    if task_cfg.num_heldout < 0:
        raise ValueError(f"data.synthetic.num_heldout: must be >= 0, got {task_cfg.num_heldout}")


KINDS = ("arithmetic", "word_problems")
HELDOUT_BUCKETS = 10  # of 100: about a tenth of the problem space is held out when num_heldout > 0
MAX_DRAWS_PER_PROBLEM = 200  # a task space too small to fill a split fails instead of looping


def is_heldout(problem: str) -> bool:
    """Whether `problem` lies on the held-out side of the split (a fixed function of its text)."""
    return int(hashlib.sha256(problem.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_BUCKETS


def _draw(task_cfg, rng: random.Random, operators: list[str]) -> tuple[str, str]:
    if task_cfg.kind == "word_problems":
        return word_problem(rng, rng.choice(operators), task_cfg.min_value, task_cfg.max_value)
    terms = [rng.randint(task_cfg.min_value, task_cfg.max_value) for _ in range(task_cfg.num_terms)]
    ops = [rng.choice(operators) for _ in range(task_cfg.num_terms - 1)]
    problem = str(terms[0]) + "".join(f"{op}{value}" for op, value in zip(ops, terms[1:]))
    return problem, str(evaluate_expression(terms, ops))


def num_distinct_problems(task_cfg):
    """How many distinct arithmetic problems the task can produce (values^terms x operators^(terms-1)); None for
    word problems, whose wording varies too."""
    if task_cfg.kind != "arithmetic":
        return None
    values = task_cfg.max_value - task_cfg.min_value + 1
    return values ** task_cfg.num_terms * len(set(task_cfg.operators)) ** (task_cfg.num_terms - 1)


def generate_problems(task_cfg, split: str = "train") -> list[dict]:
    """Records `{"id", "problem", "answer"}`; the same config gives the same list.

    split "train": `task_cfg.num_problems` problems (repeats allowed when the space of distinct problems is
    smaller), none of them held out when `num_heldout` > 0. split "heldout": `num_heldout` distinct problems
    of the held-out side. ValueError naming data.synthetic.num_heldout when the space cannot fill a split.
    """
    check_task_config(task_cfg)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    operators = list(dict.fromkeys(task_cfg.operators))
    split_on = task_cfg.num_heldout > 0
    if split == "heldout" and not split_on:
        raise ValueError("data.synthetic.num_heldout: must be >= 1 for a held-out benchmark (format: synthetic)")
    want = task_cfg.num_problems if split == "train" else task_cfg.num_heldout
    space = num_distinct_problems(task_cfg)
    if split == "heldout" and space is not None and want > space:  # fail now, not after want * 200 draws
        raise ValueError(f"data.synthetic.num_heldout: {want} exceeds the {space} distinct problems of the whole "
                         f"task space (kind={task_cfg.kind}, values {task_cfg.min_value}..{task_cfg.max_value}, "
                         f"{task_cfg.num_terms} terms, operators {task_cfg.operators!r}); about "
                         f"{HELDOUT_BUCKETS}% of it is held out")
    rng = random.Random(task_cfg.seed if split == "train" else f"{task_cfg.seed}:heldout")
    records, seen = [], set()
    for _ in range(want * MAX_DRAWS_PER_PROBLEM):
        if len(records) == want:
            break
        problem, answer = _draw(task_cfg, rng, operators)
        if split_on and is_heldout(problem) != (split == "heldout"):
            continue
        if split == "heldout":
            if problem in seen:
                continue
            seen.add(problem)
        records.append({"id": f"{'synthetic' if split == 'train' else 'heldout'}-{len(records)}",
                        "problem": problem, "answer": answer})
    if len(records) < want:
        raise ValueError(f"data.synthetic.num_heldout: the task space (kind={task_cfg.kind}, values "
                         f"{task_cfg.min_value}..{task_cfg.max_value}, operators {task_cfg.operators!r}) gave only "
                         f"{len(records)} of {want} {split} problems")
    return records
