"""Issue 28 (input validation): duplicate YAML keys, a checked range for every numeric key, the context length."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from megatron_rence import config as config_module
from megatron_rence.config import Config, ConfigError
from megatron_rence.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes/demo_cpu.yaml"


# ---- item 6: a key or section given twice is an error naming both lines (PyYAML keeps the last silently)
def test_duplicate_section_names_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("base: %s\ntrain:\n  run_dir: runs/mine\n  num_steps: 7\nmodel:\n  num_layers: 2\n"
                      "train:\n  seed: 3\n" % DEMO)
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}:7: duplicate key 'train' at line 7 (first at line 2)"), err.value


def test_duplicate_key_inside_a_section_names_both_lines(tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("base: %s\noptim:\n  lr: 1.0e-3\n  clip_grad: 0.5\n  lr: 1.0e-4\n" % DEMO)
    with pytest.raises(ConfigError, match=r"dup\.yaml:5: duplicate key 'lr' at line 5 \(first at line 3\)"):
        load_recipe(recipe)


def test_duplicate_key_in_a_base_recipe_names_that_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("reward:\n  num_workers: 1\n  num_workers: 2\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\n")
    with pytest.raises(ConfigError, match=r"parent\.yaml:3: duplicate key 'num_workers' at line 3 \(first at line 2\)"):
        load_recipe(tmp_path / "child.yaml")


def test_the_same_key_in_different_sections_is_fine(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("base: %s\ntrain:\n  seed: 3\ndata:\n  seed: 3\n" % DEMO)
    cfg = load_recipe(recipe)
    assert cfg.train.seed == 3 and cfg.data.seed == 3 and cfg.train.num_steps == 800  # from demo_cpu


# ---- item 8: every numeric key has a range; NaN / inf / negatives / absurd sizes are refused, naming the key
def _numeric_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        inner = args[0]
        if dataclasses.is_dataclass(inner):
            yield from _numeric_keys(inner, f"{prefix}{f.name}.")
        elif inner in (int, float):
            yield f"{prefix}{f.name}"


def test_every_numeric_key_has_a_range():
    keys = set(_numeric_keys(Config))
    assert keys - set(config_module.RANGES) == set(), "numeric keys without a range in config.RANGES"
    assert set(config_module.RANGES) - keys == set(), "RANGES names keys that do not exist"
    for key in keys:  # the defaults lie inside their ranges
        value = config_module._get_dotted(Config(), key)
        assert value is None or config_module.RANGES[key].violation(value) is None, key


@pytest.mark.parametrize("override,message", [
    ("optim.lr=nan", "optim.lr: must be a finite number, got nan"),
    ("reward.correct=nan", "reward.correct: must be a finite number, got nan"),
    ("reward.incorrect=-inf", "reward.incorrect: must be a finite number, got -inf"),
    ("optim.adam_beta1=1.0", "optim.adam_beta1: must be < 1, got 1.0"),
    ("optim.adam_beta2=-0.1", "optim.adam_beta2: must be >= 0, got -0.1"),
    ("optim.adam_eps=0", "optim.adam_eps: must be > 0, got 0.0"),
    ("optim.clip_grad=-1", "optim.clip_grad: must be >= 0, got -1.0"),
    ("optim.weight_decay=inf", "optim.weight_decay: must be a finite number, got inf"),
    ("objective.positive_threshold=nan", "objective.positive_threshold: must be a finite number, got nan"),
    ("objective.kl_coef=-0.1", "objective.kl_coef: must be >= 0, got -0.1"),
    ("objective.kl_target=nan", "objective.kl_target: must be a finite number, got nan"),
    ("objective.beta=inf", "objective.beta: must be a finite number, got inf"),
    ("objective.margin_alpha=-1", "objective.margin_alpha: must be >= 0, got -1.0"),
    ("eval.temperature=-0.5", "eval.temperature: must be >= 0, got -0.5"),
    ("eval.top_p=0", "eval.top_p: must be > 0, got 0.0"),
    ("eval.top_p=1.5", "eval.top_p: must be <= 1, got 1.5"),
    ("train.max_minutes=nan", "train.max_minutes: must be a finite number, got nan"),
    ("model.rope_scaling_factor=-8", "model.rope_scaling_factor: must be > 0, got -8.0"),
    ("rollout.sglang.mem_fraction_static=1.5", "rollout.sglang.mem_fraction_static: must be < 1, got 1.5"),
    ("reward.num_workers=100000", "reward.num_workers: must be <= 256, got 100000"),
    ("train.num_threads=100000", "train.num_threads: must be <= 1024, got 100000"),
    ("data.max_record_bytes=1e12", "data.max_record_bytes: must be <= 16777216, got 1000000000000"),
    ("train.seed=-1", "train.seed: must be >= 0, got -1"),
])
def test_bad_numbers_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(DEMO, [override])
    assert str(err.value).startswith("command-line override") and message in str(err.value), err.value


@pytest.mark.parametrize("overrides,message", [
    (["reward.correct=0", "reward.incorrect=0"], "reward.correct: must be above reward.incorrect=0.0, got 0.0"),
    (["objective.positive_threshold=1.5"], "objective.positive_threshold: must lie in (reward.incorrect, "
                                           "reward.correct] = (0.0, 1.0]"),
    (["optim.min_lr=1"], "optim.min_lr: must be <= optim.lr=0.001, got 1.0"),
    (["data.synthetic.max_value=-1"], "data.synthetic.max_value: must be >= 0, got -1"),
    (["data.synthetic.min_value=5"], "data.synthetic.max_value: must be >= data.synthetic.min_value=5, got 4"),
    (["train.max_seq_len=4096"], "train.max_seq_len: 4096 exceeds model.max_position_embeddings=128"),
    (["eval.every=10", "eval.benchmarks=[{format: synthetic}]", "data.synthetic.num_heldout=2"],
     "eval.max_new_tokens: 1024 leaves no room for a prompt in model.max_position_embeddings=128"),
])
def test_keys_that_bound_each_other(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(DEMO, overrides)
    assert message in str(err.value), err.value


def test_nan_in_a_file_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(DEMO), "reward": {"correct": float("nan")}}))
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert str(err.value).startswith(f"{recipe}: reward.correct: must be a finite number, got nan"), err.value


def test_max_seq_len_is_checked_against_the_hf_config(tmp_path):
    import json

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 96, "tie_word_embeddings": False, "rope_theta": 10000.0}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(DEMO), "model": {"hf_path": str(hf)}}))
    assert load_recipe(recipe).model.max_position_embeddings == 96  # demo_cpu's 128 replaced; max_seq_len 64 fits
    with pytest.raises(ConfigError, match=r"override.*train\.max_seq_len: 100 exceeds model\.max_position_embeddings=96"):
        load_recipe(recipe, ["train.max_seq_len=100"])


def test_cli_dry_run_refuses_nan_and_absurd_sizes():
    for override, message in [("reward.correct=nan", "reward.correct: must be a finite number, got nan"),
                              ("reward.num_workers=100000", "reward.num_workers: must be <= 256, got 100000")]:
        proc = subprocess.run([sys.executable, "-m", "megatron_rence.train", str(DEMO), override, "--dry-run"],
                              cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
