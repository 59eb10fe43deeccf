"""Recipe loading: base inheritance, dotted overrides, type coercion, and errors that name the key and file."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_rence.config import Config, ConfigError, check_world_size
from megatron_rence.recipe import dump_yaml, load_recipe, save_resolved

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def recipes(tmp_path):
    write(tmp_path / "parent.yaml", {
        "model": {"num_layers": 4, "hidden_size": 128},
        "objective": {"name": "grpo", "beta": 0.5},
        "train": {"global_batch_size": 64, "micro_batch_size": 8},
        "rollout": {"prompts_per_step": 8, "num_samples": 8, "max_new_tokens": 64},
    })
    write(tmp_path / "child.yaml", {"base": "parent.yaml", "objective": {"beta": 2.0}, "optim": {"lr": "1e-5"}})
    return tmp_path


def test_base_inheritance_deep_merges(recipes):
    cfg = load_recipe(recipes / "child.yaml")
    assert cfg.objective.name == "grpo"  # from the parent
    assert cfg.objective.beta == 2.0  # child wins
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 128
    assert cfg.optim.lr == pytest.approx(1e-5)  # YAML 1.1 string "1e-5" coerced to float
    assert cfg.model.ffn_hidden_size == Config().model.ffn_hidden_size  # untouched default


def test_dotted_overrides_are_coerced(recipes):
    cfg = load_recipe(recipes / "child.yaml", ["objective.name=rence", "rollout.num_samples=16",
                                               "objective.margin_alpha=1", "rollout.stop=[</s>, END]",
                                               "model.fp8=null", "data.id_key=uid"])
    assert cfg.objective.name == "rence"
    assert cfg.rollout.num_samples == 16 and isinstance(cfg.rollout.num_samples, int)
    assert cfg.objective.margin_alpha == 1.0 and isinstance(cfg.objective.margin_alpha, float)
    assert cfg.rollout.stop == ["</s>", "END"]
    assert cfg.model.fp8 is None and cfg.data.id_key == "uid"


@pytest.mark.parametrize("override, key", [
    ("objective.no_such_key=1", "objective.no_such_key"),
    ("nosection.x=1", "nosection"),
    ("rollout.num_samples=abc", "rollout.num_samples"),
    ("rollout.num_samples=1.5", "rollout.num_samples"),
    ("objective.name=ppo", "objective.name"),
    ("logging.jsonl=3", "logging.jsonl"),
    ("model.num_layers=true", "model.num_layers"),
])
def test_bad_overrides_name_the_key(recipes, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(recipes / "child.yaml", [override])


def test_unknown_key_in_file_names_file_and_key(recipes):
    write(recipes / "bad.yaml", {"base": "parent.yaml", "optim": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError) as exc:
        load_recipe(recipes / "bad.yaml")
    assert "bad.yaml" in str(exc.value) and "optim.learning_rate" in str(exc.value)


def test_error_in_parent_names_the_parent(recipes):
    write(recipes / "parent2.yaml", {"train": {"micro_batch_sz": 2}})
    write(recipes / "child2.yaml", {"base": "parent2.yaml"})
    with pytest.raises(ConfigError, match=r"parent2\.yaml: train\.micro_batch_sz"):
        load_recipe(recipes / "child2.yaml")


@pytest.mark.parametrize("override, key", [
    ("parallel.tp=3", "parallel.tp"),  # 4 heads not divisible by 3
    ("parallel.pp=3", "parallel.pp"),  # 4 layers not divisible by 3
    ("train.micro_batch_size=7", "train.global_batch_size"),
    ("rollout.prompts_per_step=3", "train.global_batch_size"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel"),
    ("rollout.max_new_tokens=5000", "rollout.max_new_tokens"),
    ("objective.t_easy=1.5", "objective.t_easy"),
    ("model.num_query_groups=3", "model.num_query_groups"),
])
def test_impossible_combinations(recipes, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(recipes / "child.yaml", [override])


def test_world_size_checks(recipes):
    cfg = load_recipe(recipes / "child.yaml", ["parallel.tp=2"])
    assert check_world_size(cfg, 8) == 4  # dp = 8 / 2
    with pytest.raises(ConfigError, match="world size"):
        check_world_size(cfg, 3)
    cfg = load_recipe(recipes / "child.yaml", ["train.micro_batch_size=32"])
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        check_world_size(cfg, 4)  # 64 not divisible by 32 * 4


def test_base_cycle_and_missing_file(recipes):
    write(recipes / "a.yaml", {"base": "b.yaml"})
    write(recipes / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(recipes / "a.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_recipe(recipes / "missing.yaml")


def test_resolved_config_round_trips(recipes, tmp_path):
    cfg = load_recipe(recipes / "child.yaml", ["eval.benchmarks=[{name: aime24, path: /x.jsonl}]"])
    assert cfg.eval.benchmarks[0].name == "aime24"
    out = save_resolved(cfg, tmp_path / "run")
    again = load_recipe(out)
    assert dump_yaml(again) == dump_yaml(cfg)


def test_every_shipped_recipe_loads():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)


def test_cli_unknown_key_exits_with_message():
    proc = subprocess.run([sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml",
                           "objective.no_such_key=1"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "objective.no_such_key" in proc.stderr


def test_cli_print_config_is_loadable_yaml():
    proc = subprocess.run([sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml",
                           "--print-config", "objective.name=dapo"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["objective"]["name"] == "dapo" and data["rollout"]["engine"] == "hf"
