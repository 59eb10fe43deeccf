"""The CPU demo's verifiable task: integer arithmetic problems ("3+5*2" -> "13") generated from a seed."""
from __future__ import annotations

import random

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


def generate_problems(task_cfg) -> list[dict]:
    """`task_cfg.num_problems` records `{"id", "problem", "answer"}`; the same config gives the same list.

    Problems may repeat when the space of distinct problems is smaller than `num_problems`.
    """
    check_task_config(task_cfg)
    rng = random.Random(task_cfg.seed)
    operators = list(dict.fromkeys(task_cfg.operators))
    records = []
    for i in range(task_cfg.num_problems):
        terms = [rng.randint(task_cfg.min_value, task_cfg.max_value) for _ in range(task_cfg.num_terms)]
        ops = [rng.choice(operators) for _ in range(task_cfg.num_terms - 1)]
        problem = str(terms[0]) + "".join(f"{op}{value}" for op, value in zip(ops, terms[1:]))
        records.append({"id": f"synthetic-{i}", "problem": problem, "answer": str(evaluate_expression(terms, ops))})
    return records
