"""Recipe settings that cannot change training: each is warned about at load (recipe.load_recipe), naming its key.

Only settings whose effect is nil (or, where said, nil up to optim.adam_eps) are listed, and only when they
differ from their defaults (a resolved config.yaml spells every key out); docs/design.md, "Settings that cannot
have an effect", works out each case.
"""
from __future__ import annotations

import dataclasses
from megatron_rence.config import Config, ObjectiveConfig, max_positives_kept

# objective keys each objective reads (the others have no effect for it); name / positive_threshold / kl_* for all
_OBJECTIVE_KEYS = {
    "rence": {"beta", "margin_alpha", "reduce_positives", "length_normalize", "t_easy", "hard_negative_samples",
              "score_against"},
    "grpo": {"clip_eps_low", "clip_eps_high", "token_level_loss", "dynamic_sampling", "overlong_buffer",
             "overlong_penalty", "normalize_std", "tis_cap", "dual_clip_c"},
    "online_dpo": {"beta", "length_normalize", "max_pairs_per_group", "ref_update_every"},
}
_OBJECTIVE_KEYS["dapo"] = _OBJECTIVE_KEYS["grpo"]
_COMMON_OBJECTIVE_KEYS = {"name", "positive_threshold", "kl_coef", "kl_target", "kl_window"}


def ineffective_settings(cfg: Config) -> list[tuple[str, str]]:
    """(dotted key, why) for each setting that cannot change training."""
    o = cfg.objective
    defaults = ObjectiveConfig()
    changed = lambda key: getattr(o, key) != getattr(defaults, key)  # noqa: E731
    out: list[tuple[str, str]] = []
    reads = _OBJECTIVE_KEYS.get(o.name, set()) | _COMMON_OBJECTIVE_KEYS
    for f in dataclasses.fields(ObjectiveConfig):
        value = getattr(o, f.name)
        if f.name not in reads and value != getattr(defaults, f.name):
            out.append((f"objective.{f.name}", f"{value!r} has no effect with objective.name={o.name}"))
    if o.kl_target is None and o.kl_window != defaults.kl_window:
        out.append(("objective.kl_window", f"{o.kl_window} has no effect without objective.kl_target "
                    f"(the KL coefficient stays objective.kl_coef={o.kl_coef})"))
    out += _microbatch_settings(cfg)
    if o.name in ("grpo", "dapo"):
        if changed("positive_threshold"):
            out.append(("objective.positive_threshold", f"{o.positive_threshold} changes only the groups/* and "
                        f"rollout/* metrics with objective.name={o.name}: advantages, dynamic sampling and overlong "
                        f"shaping use the rewards themselves"))
        if o.overlong_buffer == 0 and changed("overlong_penalty"):
            out.append(("objective.overlong_penalty", f"{o.overlong_penalty} has no effect with "
                        f"objective.overlong_buffer=0 (overlong shaping is off)"))
    k = cfg.rollout.num_samples
    if o.name == "online_dpo" and k == 2 and changed("max_pairs_per_group"):
        out.append(("objective.max_pairs_per_group", f"{o.max_pairs_per_group} has no effect at "
                    f"rollout.num_samples=2: a group has at most one (positive, negative) pair"))
    if o.name == "rence":
        out += _rence_settings(cfg, changed)
    return out


def _microbatch_settings(cfg: Config) -> list[tuple[str, str]]:
    """train.micro_batch_size / logprobs_micro_batch_size under a token budget: the trainer packs by tokens."""
    t, defaults = cfg.train, type(cfg.train)()
    if not (t.packing and t.max_tokens_per_microbatch):
        return []
    out = []
    for key in ("micro_batch_size", "logprobs_micro_batch_size"):
        if getattr(t, key) != getattr(defaults, key):
            out.append((f"train.{key}", f"{getattr(t, key)} has no effect: train.max_tokens_per_microbatch="
                        f"{t.max_tokens_per_microbatch} packs whole groups (sequences for log-prob passes) up to "
                        f"that many tokens per microbatch"))
    return out


def _scale_only(cfg: Config) -> str | None:
    """Why every ReNCE score is 0 at its update and a constant gradient scale cancels in the optimizer step
    (None if not): then beta, and at K=2 the margin, only scale the gradient."""
    o, t, r, opt = cfg.objective, cfg.train, cfg.rollout, cfg.optim
    one_step = t.global_batch_size >= r.prompts_per_step * r.num_samples
    if not (one_step or o.score_against == "current") or t.old_logprobs != "trainer":
        return None
    if o.kl_coef > 0 or o.kl_target is not None or opt.clip_grad != 0:
        return None
    if opt.optimizer == "adam" and opt.weight_decay > 0:
        return None  # L2 decay is added to the gradient: its scale sets the balance between loss and decay
    when = (f"one optimizer step per rollout (train.global_batch_size={t.global_batch_size})" if one_step
            else "objective.score_against=current")
    return (f"with {when} every ReNCE score is 0 at its update, so this only scales the gradient; "
            f"{opt.optimizer} divides a constant gradient scale out (no KL term, optim.clip_grad=0"
            f"{', decoupled weight decay' if opt.weight_decay > 0 else ''}) except through "
            f"optim.adam_eps={opt.adam_eps:g}, which matters only for gradient elements near adam_eps")


def _rence_settings(cfg: Config, changed) -> list[tuple[str, str]]:
    o, k = cfg.objective, cfg.rollout.num_samples
    out = []
    if o.t_easy < 1.0 and max_positives_kept(o.t_easy, k) >= k - 1:
        out.append(("objective.t_easy", f"{o.t_easy} drops no group at rollout.num_samples={k}: a group with "
                    f"both positives and negatives has at most {k - 1} of {k} positives, and groups "
                    f"without negatives are dropped anyway (choose t_easy < {(k - 1) / k:.4g})"))
    if k == 2 and changed("reduce_positives"):
        out.append(("objective.reduce_positives", f"{o.reduce_positives!r} has no effect at rollout.num_samples=2: "
                    f"every usable group has exactly one positive, so mean and sum agree"))
    scale_only = _scale_only(cfg)
    if scale_only and o.beta != ObjectiveConfig().beta:
        out.append(("objective.beta", f"{o.beta} has almost no effect: {scale_only}"))
    if scale_only and k == 2 and changed("margin_alpha"):
        out.append(("objective.margin_alpha", f"{o.margin_alpha} has almost no effect at rollout.num_samples=2: "
                    f"every usable group has one negative, so the margin gives every group the same weight; "
                    f"{scale_only}"))
    return out
