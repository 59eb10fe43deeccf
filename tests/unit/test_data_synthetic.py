"""The generated tasks: the demo's arithmetic unchanged, word problems with exact answers, a disjoint held-out split."""
import random
import re

import pytest

from megatron_rence.config import ConfigError, SyntheticTaskConfig
from megatron_rence.data.synthetic import evaluate_expression, generate_problems, is_heldout
from megatron_rence.recipe import load_recipe


def old_demo_problems(cfg):
    """The generator as it was before word problems and splits (the demo's problems must not change)."""
    rng = random.Random(cfg.seed)
    out = []
    for i in range(cfg.num_problems):
        terms = [rng.randint(cfg.min_value, cfg.max_value) for _ in range(cfg.num_terms)]
        ops = [rng.choice(list(dict.fromkeys(cfg.operators))) for _ in range(cfg.num_terms - 1)]
        problem = str(terms[0]) + "".join(f"{op}{v}" for op, v in zip(ops, terms[1:]))
        out.append({"id": f"synthetic-{i}", "problem": problem, "answer": str(evaluate_expression(terms, ops))})
    return out


@pytest.mark.parametrize("cfg", [SyntheticTaskConfig(max_value=4, num_problems=50),
                                 SyntheticTaskConfig(num_terms=3, operators="+-*", num_problems=40, seed=3)])
def test_arithmetic_without_split_is_unchanged(cfg):
    assert generate_problems(cfg) == old_demo_problems(cfg)


@pytest.mark.parametrize("op,fn", [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)])
def test_word_problem_answers_are_exact(op, fn):
    cfg = SyntheticTaskConfig(kind="word_problems", operators=op, min_value=1, max_value=20, num_problems=200)
    records = generate_problems(cfg)
    assert len(records) == 200 and len({r["problem"] for r in records}) > 150
    for r in records:
        a, b = map(int, re.findall(r"\d+", r["problem"]))
        assert r["answer"] == str(fn(a, b)) and int(r["answer"]) >= 0, r
        assert r["problem"].endswith("?")


def test_heldout_split_is_disjoint_distinct_and_deterministic():
    cfg = SyntheticTaskConfig(kind="word_problems", operators="+-", min_value=1, max_value=20, num_problems=600,
                              num_heldout=40)
    train, heldout = generate_problems(cfg), generate_problems(cfg, split="heldout")
    assert len(train) == 600 and len(heldout) == 40
    assert not any(is_heldout(r["problem"]) for r in train) and all(is_heldout(r["problem"]) for r in heldout)
    assert len({r["problem"] for r in heldout}) == 40
    assert not {r["problem"] for r in train} & {r["problem"] for r in heldout}
    assert [r["id"] for r in heldout[:2]] == ["heldout-0", "heldout-1"]
    assert generate_problems(cfg, split="heldout") == heldout and generate_problems(cfg) == train
    # without a split nothing is removed: some training problems then lie in the held-out buckets
    unsplit = generate_problems(SyntheticTaskConfig(kind="word_problems", operators="+-", min_value=1,
                                                    max_value=20, num_problems=600))
    assert any(is_heldout(r["problem"]) for r in unsplit)


def test_split_errors_name_the_key():
    tiny = SyntheticTaskConfig(max_value=1, num_problems=4, num_heldout=5)  # 4 distinct problems in all
    with pytest.raises(ValueError, match="data.synthetic.num_heldout"):
        generate_problems(tiny, split="heldout")
    with pytest.raises(ValueError, match="data.synthetic.num_heldout"):
        generate_problems(SyntheticTaskConfig(), split="heldout")
    with pytest.raises(ValueError, match="data.synthetic.num_terms"):
        generate_problems(SyntheticTaskConfig(kind="word_problems", num_terms=3))


@pytest.mark.parametrize("override,key", [
    ("train.num_threads=-1", "train.num_threads"),
    ("train.max_minutes=-2", "train.max_minutes"),
    ("data.synthetic.num_heldout=0", "data.synthetic.num_heldout"),
])
def test_real_recipe_validation_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_recipe("recipes/smollm2_cpu.yaml", [override])
