"""Settings that cannot have an effect (ineffective.ineffective_settings, warned at load), the objective keys added
for the ReNCE reconstruction, and the paper recipe's ablations (each switches off one component)."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from megatron_rence.config import Config, ConfigError, ConfigWarning, to_dict
from megatron_rence.ineffective import ineffective_settings
from megatron_rence.objectives.groups import contrastive_groups, too_easy
from megatron_rence.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "recipes/qwen3_4b_paper.yaml"


def keys(cfg: Config) -> list[str]:
    return [key for key, _ in ineffective_settings(cfg)]


def rence(k: int = 8, **objective) -> Config:
    cfg = Config()
    cfg.rollout.num_samples, cfg.rollout.prompts_per_step, cfg.train.global_batch_size = k, 32, 32 * k
    cfg.objective = dataclasses.replace(cfg.objective, **objective)
    return cfg


@pytest.mark.parametrize("k", range(2, 17))
def test_t_easy_warning_iff_the_filter_drops_no_contrastive_group(k):
    # every possible contrastive group at K: 1..K-1 positives; the warning must agree with too_easy itself
    num_pos = torch.arange(1, k)
    is_pos = torch.arange(k)[None, :] < num_pos[:, None]
    assert contrastive_groups(is_pos).all()
    near = set()
    for c in range(1, k):  # values at and around every count boundary c/k, in every precision a user might type
        exact = c / k
        near |= {exact, math.nextafter(exact, 0.0), math.nextafter(exact, 1.0),
                 float(torch.tensor(exact, dtype=torch.float32))}
        near |= {round(exact, digits) for digits in range(1, 9)}
    grid = {(k - 1) / k, (k - 2) / k, 0.5, 0.75, 0.8, 0.875, 0.9, 0.95, 0.99, 0.0} | near
    for t_easy in sorted(t for t in grid if 0.0 <= t < 1.0):
        drops_some = bool(too_easy(is_pos, t_easy).any())
        warned = "objective.t_easy" in keys(rence(k, t_easy=t_easy))
        assert warned == (not drops_some), (k, t_easy)
    assert "objective.t_easy" not in keys(rence(k, t_easy=1.0))  # 1.0 is "off", not a mistake


def test_t_easy_one_precision_filter_and_warning_agree():
    # K=6, t_easy typed as 0.8333333 (< 5/6 as reals): a group with 5 of 6 correct is too easy, and since the
    # filter drops something there is no warning. (In float32, 5/6 and 0.8333333 are the same number: the old
    # filter kept the group while the float64 warning check assumed it dropped.)
    is_pos = torch.tensor([[True] * 5 + [False], [True] * 4 + [False] * 2])
    assert too_easy(is_pos, 0.8333333).tolist() == [True, False]
    assert "objective.t_easy" not in keys(rence(6, t_easy=0.8333333))
    assert too_easy(is_pos, 5 / 6).tolist() == [False, False]
    assert "objective.t_easy" in keys(rence(6, t_easy=5 / 6))


def test_hard_negative_samples_only_for_rence():
    from megatron_rence.config import samples_per_prompt

    cfg = rence(k=8, hard_negative_samples=4)
    assert samples_per_prompt(cfg) == 12 and keys(cfg) == []
    cfg.objective.name = "grpo"  # the baselines on the paper recipe sample K and warn that the key does nothing
    assert samples_per_prompt(cfg) == 8 and keys(cfg) == ["objective.hard_negative_samples"]


def test_keys_another_objective_does_not_read():
    cfg = rence(margin_alpha=1.0, t_easy=0.5, beta=2.0)
    cfg.objective.name = "grpo"
    assert keys(cfg) == ["objective.beta", "objective.margin_alpha", "objective.t_easy"]
    cfg.objective.name = "online_dpo"  # reads beta
    assert keys(cfg) == ["objective.margin_alpha", "objective.t_easy"]
    cfg = rence(clip_eps_low=0.1, dual_clip_c=3.0, max_pairs_per_group=2)
    assert keys(cfg) == ["objective.clip_eps_low", "objective.max_pairs_per_group", "objective.dual_clip_c"]
    assert keys(rence(kl_window=5)) == ["objective.kl_window"]
    assert keys(rence(kl_window=5, kl_coef=0.1, kl_target=0.1)) == []


def test_beta_warning_only_where_beta_only_scales_the_gradient():
    cfg = rence(beta=0.5)
    cfg.optim.clip_grad = 0.0
    assert keys(cfg) == ["objective.beta"]  # one step per rollout, trainer old log-probs, no KL, no clipping
    for change in ({"optim.clip_grad": 1.0}, {"train.global_batch_size": 64}, {"train.old_logprobs": "engine"},
                   {"objective.kl_coef": 0.01}, {"objective.beta": 1.0}):
        other = rence(beta=0.5)
        other.optim.clip_grad = 0.0
        (key, value), = change.items()
        section, field = key.split(".")
        setattr(getattr(other, section), field, value)
        assert keys(other) == [], change


def test_beta_warning_respects_the_optimizer():
    # optim.optimizer=adam adds weight decay to the gradient (L2): beta then sets the balance between the loss and
    # the decay, so it has an effect; AdamW's decoupled decay, or no decay, leaves beta a pure gradient scale
    for optimizer, weight_decay, warned in (("adam", 0.01, False), ("adam", 0.0, True), ("adamw", 0.01, True)):
        cfg = rence(beta=0.5)
        cfg.optim.clip_grad, cfg.optim.optimizer, cfg.optim.weight_decay = 0.0, optimizer, weight_decay
        assert ("objective.beta" in keys(cfg)) == warned, (optimizer, weight_decay)
    why = dict(ineffective_settings(cfg))["objective.beta"]
    assert "optim.adam_eps=1e-08" in why and "almost no effect" in why  # not "provably nil": eps breaks scale


def test_score_against_current_counts_as_one_step_per_rollout():
    cfg = rence(beta=0.5, score_against="current")
    cfg.optim.clip_grad, cfg.train.global_batch_size = 0.0, 64  # 4 optimizer steps per rollout
    assert keys(cfg) == ["objective.beta"]
    cfg.objective.score_against = "old"
    assert keys(cfg) == []
    cfg.objective.name, cfg.objective.score_against = "grpo", "current"
    assert keys(cfg) == ["objective.beta", "objective.score_against"]


def test_settings_without_effect_for_the_baselines_and_at_k2():
    cfg = rence(positive_threshold=0.7, overlong_penalty=2.0)
    cfg.objective.name = "grpo"  # positive_threshold: metrics only; the penalty without a buffer: shaping is off
    assert keys(cfg) == ["objective.positive_threshold", "objective.overlong_penalty"]
    cfg.objective.overlong_buffer = 16
    assert keys(cfg) == ["objective.positive_threshold"]
    cfg.objective.name = "online_dpo"  # splits pairs by the threshold: an effect
    assert "objective.positive_threshold" not in keys(cfg)
    dpo = rence(2, max_pairs_per_group=3)
    dpo.objective.name = "online_dpo"
    assert keys(dpo) == ["objective.max_pairs_per_group"]  # K=2: at most one pair per group
    dpo.rollout.num_samples, dpo.rollout.prompts_per_step = 4, 64
    assert keys(dpo) == []
    assert keys(rence(2, reduce_positives="sum")) == ["objective.reduce_positives"]  # one positive per group
    assert keys(rence(4, reduce_positives="sum")) == []
    margin = rence(2, margin_alpha=1.0)
    assert keys(margin) == []  # clip_grad 1.0 (the default): the margin's scale changes the clipped step
    margin.optim.clip_grad = 0.0
    assert keys(margin) == ["objective.margin_alpha"]  # K=2: one negative per group, every group weighs the same
    margin.rollout.num_samples, margin.rollout.prompts_per_step = 4, 64
    assert keys(margin) == []


def test_microbatch_size_has_no_effect_under_a_token_budget():
    cfg = rence()
    cfg.train.micro_batch_size, cfg.train.max_tokens_per_microbatch = 8, 4096
    assert keys(cfg) == ["train.micro_batch_size"]
    cfg.train.logprobs_micro_batch_size = 16
    assert keys(cfg) == ["train.micro_batch_size", "train.logprobs_micro_batch_size"]
    cfg.train.max_tokens_per_microbatch = 0
    assert keys(cfg) == []


def test_shipped_recipes_load_without_warnings():
    import warnings

    for path in sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes/ablations").glob("*.yaml")):
        if path.name == "base.yaml":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConfigWarning)
            load_recipe(path)


def test_warnings_are_emitted_at_load_naming_the_key():
    with pytest.warns(ConfigWarning, match=r"qwen3_4b_paper\.yaml: objective\.margin_alpha: 1\.0 has no effect "
                                           r"with objective\.name=grpo"):
        load_recipe(PAPER, ["objective.name=grpo"])
    with pytest.warns(ConfigWarning, match=r"objective\.t_easy: 0\.875 drops no group at rollout\.num_samples=8"):
        load_recipe(PAPER, ["objective.t_easy=0.875"])


@pytest.mark.parametrize("overrides, message", [
    (["objective.hard_negative_samples=-1"], r"objective\.hard_negative_samples: must be >= 0"),
    (["objective.name=dapo", "objective.hard_negative_samples=0", "objective.dual_clip_c=1.0"],
     r"objective\.dual_clip_c: must be > 1"),
])
def test_new_objective_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(PAPER, overrides)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_paper_recipe_runs_every_component_and_each_ablation_switches_one_off():
    paper = load_recipe(PAPER)
    o, t, r = paper.objective, paper.train, paper.rollout
    assert o.name == "rence" and o.margin_alpha > 0 and o.kl_coef > 0 and o.kl_target is not None
    assert o.hard_negative_samples > 0 and (r.num_samples - 1) / r.num_samples > o.t_easy
    assert r.prompts_per_step * r.num_samples // t.global_batch_size > 1  # several optimizer steps per rollout
    expected = {
        "no_margin": {"objective.margin_alpha": 0.0},
        "no_kl": {"objective.kl_coef": 0.0, "objective.kl_target": None},
        "fixed_kl": {"objective.kl_target": None},
        "no_easy_filter": {"objective.t_easy": 1.0},
        "no_hard_negatives": {"objective.hard_negative_samples": 0},
        "one_step_per_rollout": {"objective.score_against": "current"},  # same batch and step count
    }
    shipped = sorted(p.stem for p in (REPO / "recipes/ablations").glob("*.yaml"))
    assert shipped == sorted(expected)
    base = flat(to_dict(paper))
    for name, change in expected.items():
        ablation = flat(to_dict(load_recipe(REPO / f"recipes/ablations/{name}.yaml")))
        diff = {k: v for k, v in ablation.items() if v != base[k] and k != "train.run_dir"}
        assert diff == change, name
        assert ablation["train.run_dir"] != base["train.run_dir"]
