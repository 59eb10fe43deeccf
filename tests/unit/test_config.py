"""Recipe loading: base inheritance, dotted overrides, type coercion, and errors that name the key and file."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from megatron_rence.config import Config, ConfigError, ConfigWarning, check_world_size
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
    ("train.max_tokens_per_microbatch=-1", "train.max_tokens_per_microbatch"),
    ("train.max_tokens_per_microbatch=4096 train.packing=false", "train.max_tokens_per_microbatch"),
])
def test_impossible_combinations(recipes, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(recipes / "child.yaml", override.split())


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
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))  # recipes/ablations/ too
    assert recipes, "no recipes shipped"
    for path in recipes:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)  # no shipped setting is without effect
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


def _hf_dir(tmp_path: Path, **changes) -> Path:
    """A Llama-3.1-style config.json (no weights: the recipe only reads the architecture)."""
    import json

    config = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 96,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}, **changes}
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(config))
    return hf


def test_hf_path_fills_the_architecture(tmp_path):
    hf = _hf_dir(tmp_path)
    recipe = write(tmp_path / "r.yaml", {"base": str(REPO / "recipes/demo_cpu.yaml"),
                                         "model": {"hf_path": str(hf), "max_position_embeddings": 256}})
    m = load_recipe(recipe).model  # demo_cpu.yaml's own architecture (2 layers, hidden 64...) is replaced
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups, m.vocab_size) == (4, 64, 96, 2, 300)
    assert m.rope_scaling and m.rotary_base == 500000.0 and m.head_dim == 16
    assert m.max_position_embeddings == 256  # a shorter context is the recipe's choice


def test_hf_path_disagreeing_with_the_recipe_names_the_key(tmp_path):
    hf = _hf_dir(tmp_path)
    recipe = write(tmp_path / "r.yaml", {"base": str(REPO / "recipes/demo_cpu.yaml"),
                                         "model": {"hf_path": str(hf), "hidden_size": 128}})
    with pytest.raises(ConfigError, match=r"r\.yaml: model\.hidden_size: the recipe says 128 but .*config\.json gives 64"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match=r"override.*model\.num_layers"):
        load_recipe(recipe, ["model.hidden_size=64", "model.num_layers=8"])
    _hf_dir(tmp_path, model_type="mistral")
    with pytest.raises(ConfigError, match=r"model\.hf_path: .*model_type 'mistral' is not supported"):
        load_recipe(recipe, ["model.hidden_size=64"])


def test_unreadable_hf_path_keeps_the_recipe_fields(tmp_path):
    cfg = load_recipe(REPO / "recipes/rence_70b.yaml", [f"model.hf_path={tmp_path / 'absent'}"])
    assert cfg.model.hidden_size == 8192 and cfg.model.vocab_size == 128256


def test_debug_check_sync_needs_the_cpu_engine():
    with pytest.raises(ConfigError, match=r"train\.debug_check_sync: .*rollout\.engine=hf"):
        load_recipe(REPO / "recipes/demo_cpu.yaml", ["train.debug_check_sync=true", "rollout.engine=sglang"])


@pytest.mark.parametrize("overrides, message", [
    (["objective.tis_cap=2.0"], r"objective\.tis_cap: truncated importance sampling .* objective\.name=rence"),
    (["objective.name=grpo", "objective.tis_cap=0"], r"objective\.tis_cap: must be > 0"),
    (["objective.name=dapo", "objective.tis_cap=2", "train.old_logprobs=engine"],
     r"objective\.tis_cap: with train\.old_logprobs=engine"),
])
def test_tis_cap_combinations(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(REPO / "recipes/demo_cpu.yaml", overrides)
    assert load_recipe(REPO / "recipes/demo_cpu.yaml", ["objective.name=grpo", "objective.tis_cap=2"]).objective.tis_cap == 2


# ---- issue 17: every count has a minimum, every timeout is > 0, and the error says where the value was set
@pytest.mark.parametrize("override,key,message", [
    ("train.num_steps=-5", "train.num_steps", "must be >= 1, got -5"),
    ("model.ffn_hidden_size=0", "model.ffn_hidden_size", "must be >= 1, got 0"),
    ("reward.num_workers=-1", "reward.num_workers", "must be >= 0, got -1"),
    ("reward.timeout_s=0", "reward.timeout_s", "must be > 0, got 0.0"),
    ("rollout.max_new_tokens=-1", "rollout.max_new_tokens", "must be >= 1, got -1"),
    ("checkpoint.every=-1", "checkpoint.every", "must be >= 0, got -1"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps", "must be >= 1, got 0"),
    ("data.max_record_bytes=0", "data.max_record_bytes", "must be >= 1, got 0"),
])
def test_out_of_range_override_names_the_key_and_the_command_line(recipes, override, key, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(recipes / "child.yaml", [override])
    text = str(err.value)
    assert text.startswith("command-line override") and f"{key}: {message}" in text, text


def test_out_of_range_value_in_a_file_names_that_file(recipes):
    write(recipes / "bad_parent.yaml", {"reward": {"timeout_s": 0}, "checkpoint": {"every": -1}})
    write(recipes / "bad_child.yaml", {"base": "bad_parent.yaml", "checkpoint": {"every": 2}})
    with pytest.raises(ConfigError) as err:
        load_recipe(recipes / "bad_child.yaml")
    assert str(err.value).startswith(f"{recipes / 'bad_parent.yaml'}: reward.timeout_s: must be > 0"), err.value
    with pytest.raises(ConfigError) as err:  # an impossible combination set on the command line says so too
        load_recipe(recipes / "child.yaml", ["rollout.temperature=0"])
    assert str(err.value).startswith("command-line override") and "rollout.temperature" in str(err.value)


def test_cli_dry_run_rejects_a_negative_step_count():
    proc = subprocess.run([sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml",
                           "train.num_steps=-5", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "train.num_steps: must be >= 1, got -5" in proc.stderr, proc.stderr


# ---- issue 24 item 7: megatron's param-buffer offload (distributed optimizer) leaves the parameters unreadable
def test_offload_params_with_the_distributed_optimizer_is_refused():
    with pytest.raises(ConfigError, match=r"train\.offload_params: not with parallel\.distributed_optimizer=true: "
                                          r".*checkpoint written after the weight sync"):
        load_recipe(REPO / "recipes/rence_8b.yaml", ["train.offload_params=true"])
    cfg = load_recipe(REPO / "recipes/rence_8b.yaml", ["train.offload_params=true",
                                                        "parallel.distributed_optimizer=false"])
    assert cfg.train.offload_params and not cfg.parallel.distributed_optimizer
