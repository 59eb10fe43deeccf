"""GRPO and DAPO: group-normalised advantages with a PPO-clipped ratio surrogate (one module, two presets).

Per response token t of sequence i, with advantage A_i (group-normalised reward) and ratio
rho = exp(log pi_theta - log pi_old):
    l_it = -min(rho * A_i, clip(rho, 1 - clip_eps_low, 1 + clip_eps_high) * A_i)  [+ kl_coef * k3_it]
GRPO (sequence-level): mean over a sequence's tokens, summed over sequences / number of sequences of the
global batch. DAPO (token-level loss): summed over tokens / number of response tokens of the global batch.
DAPO's other refinements: clip-higher (clip_eps_high 0.28 by default), dynamic sampling (groups whose
verifier rewards are all equal - all correct, all wrong, or K=1 - are dropped) and overlong reward shaping
(prepare adds a penalty ramping linearly to -overlong_penalty over the last overlong_buffer tokens before
max_new_tokens). Every refinement is an option of both presets; only the defaults differ:
    option                          grpo            dapo
    objective.clip_eps_high         clip_eps_low    0.28
    objective.token_level_loss      false           true
    objective.dynamic_sampling      false           true
    objective.overlong_buffer       0 (off)         0 (off; set it relative to rollout.max_new_tokens)
    objective.tis_cap               None (off)      None (off)
    objective.dual_clip_c           None (off)      None (off)
Truncated importance sampling (objective.tis_cap = C, as in verl / slime): when the engine samples from a
slightly different policy than the trainer's pi_old (FP8 rollout weights, other kernels), each token's
clipped-surrogate term is multiplied by w_it = min(pi_old / pi_rollout, C) (no gradient; the KL term is not
weighted).
Dual clip (objective.dual_clip_c = c > 1, as verl's clip_ratio_c, whose default there is 3; Ye et al. 2020): for
a negative advantage the clipped term above is capped, l_it = min(l_it, c * |A_i|), so a token whose ratio
has grown past c (a sample the policy now favours although it was bad) stops pushing its gradient ~rho * |A|.
Positive advantages are unchanged. Off by default here; verl applies it always.
Extreme log-ratios: log pi_theta - log pi_old is clamped to [-20, 20] nats before the exp, as verl does
(kl.LOG_RATIO_CLAMP): past ~88.7 nats exp overflows float32 (an inf loss, or with dual clip a NaN gradient from
the branch torch.where discards). A clamped token's ratio is the constant e^+-20, so it gives ZERO gradient;
its loss stays finite. The KL term's clamps are in objectives/kl.py.
"""
from __future__ import annotations

import math

import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives.base import Lengths, ObjectiveBase, ObjectiveBatch, Prepared, total_length
from megatron_rence.objectives.groups import (all_equal, group_advantages, group_metrics, overlong_penalty,
                                              positives)
from megatron_rence.objectives.kl import LOG_RATIO_CLAMP


class PolicyGradient(ObjectiveBase):
    """PPO-clipped group-advantage policy gradient; subclasses set the defaults of unset (None) options."""

    uses_overlong_shaping = True
    default_clip_eps_high: float | None = None  # None: the same as clip_eps_low
    default_token_level_loss = False
    default_dynamic_sampling = False

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        self.clip_eps_low = cfg.clip_eps_low
        self.clip_eps_high = _first_set(cfg.clip_eps_high, self.default_clip_eps_high, cfg.clip_eps_low)
        self.token_level_loss = _first_set(cfg.token_level_loss, self.default_token_level_loss)
        self.dynamic_sampling = _first_set(cfg.dynamic_sampling, self.default_dynamic_sampling)
        if self.clip_eps_low < 0 or self.clip_eps_high < 0:
            raise ValueError(f"objective.clip_eps_low / clip_eps_high must be >= 0, "
                             f"got {self.clip_eps_low} / {self.clip_eps_high}")
        if cfg.tis_cap is not None and cfg.tis_cap <= 0:
            raise ValueError(f"objective.tis_cap must be > 0, got {cfg.tis_cap}")
        if cfg.dual_clip_c is not None and cfg.dual_clip_c <= 1.0:
            raise ValueError(f"objective.dual_clip_c must be > 1, got {cfg.dual_clip_c}")
        if self.clip_eps_low >= 1:
            raise ValueError(f"objective.clip_eps_low must be < 1 (the lower clip bound is 1 - eps), "
                             f"got {self.clip_eps_low}")

    @property
    def needs_rollout_logprobs(self) -> bool:
        return self.cfg.tis_cap is not None

    def prepare(self, rewards: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Prepared:
        """Overlong shaping (if overlong_buffer > 0); dynamic sampling drops zero-variance groups."""
        raw = rewards.float()
        penalty = overlong_penalty(lengths, max_new_tokens, self.cfg.overlong_buffer, self.cfg.overlong_penalty)
        shaped = raw + penalty.to(raw.device)
        zero_variance = all_equal(raw)
        keep = ~zero_variance if self.dynamic_sampling else torch.ones_like(zero_variance)
        metrics = group_metrics(positives(raw, self.cfg.positive_threshold), keep)
        metrics["groups/zero_variance_frac"] = zero_variance.float().sum().item() / max(len(keep), 1)
        metrics["objective/overlong_penalty_mean"] = penalty.mean().item() if penalty.numel() else 0.0
        metrics.update(self.kl_metrics())
        return Prepared(shaped, keep, lengths, metrics)

    def normalizer_for(self, rewards: torch.Tensor, lengths: Lengths) -> float:
        """Response tokens (token-level loss) or sequences of the kept groups, at least 1."""
        count = total_length(lengths) if self.token_level_loss else float(rewards.numel())
        return max(count, 1.0)

    def __call__(self, batch: ObjectiveBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of per-sequence token means (or of per-token terms) over the microbatch, / normalizer."""
        assert normalizer > 0, f"normalizer must be > 0, got {normalizer}"
        advantages = group_advantages(batch.grouped(batch.rewards.float()), self.cfg.normalize_std)
        adv = advantages.reshape(-1, 1)  # [N,1]
        ratio = torch.exp(batch.log_ratio().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [N,T]; 1 off the response
        clipped_ratio = ratio.clamp(1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high)
        surrogate = -torch.min(ratio * adv, clipped_ratio * adv)  # [N,T]
        dual_clipped = None
        if self.cfg.dual_clip_c is not None:  # verl's dual clip: a negative advantage's loss is capped at c*|A|
            cap = -adv * self.cfg.dual_clip_c  # [N,1]
            dual_clipped = batch.token_mask() & (adv < 0) & (surrogate > cap)
            surrogate = torch.where(adv < 0, torch.minimum(surrogate, cap), surrogate)
        per_token = batch.masked(surrogate)
        mask = batch.token_mask()
        tis = self._tis_weights(batch) if self.cfg.tis_cap is not None else None
        if tis is not None:
            per_token = per_token * tis[0]
        clipped = mask & (((ratio < 1.0 - self.clip_eps_low) & (adv < 0))
                          | ((ratio > 1.0 + self.clip_eps_high) & (adv > 0)))  # tokens whose gradient is cut
        kl_tokens = batch.kl_tokens() if self.has_kl else None
        if kl_tokens is not None:
            per_token = per_token + self.kl.coef * kl_tokens
        lengths = batch.lengths().clamp(min=1.0)

        def reduce(values: torch.Tensor) -> torch.Tensor:
            """[N,T] -> sum over tokens (token-level loss) or sum of per-sequence token means."""
            return values.sum() if self.token_level_loss else (values.sum(dim=1) / lengths).sum()

        loss = reduce(per_token) / normalizer
        with torch.no_grad():
            metrics = {
                f"loss/{self.name}": loss.item(),
                "objective/clip_frac": reduce(clipped.float()).item() / normalizer,
                "objective/ratio_mean": reduce(batch.masked(ratio)).item() / normalizer,
                "objective/advantage_abs_mean": reduce(batch.masked(adv.abs().expand_as(ratio))).item() / normalizer,
                "objective/num_sequences": float(batch.logprobs.shape[0]),
                "objective/num_tokens": float(mask.sum().item()),
            }
            if dual_clipped is not None:
                metrics["objective/dual_clip_frac"] = reduce(dual_clipped.float()).item() / normalizer
            if tis is not None:
                metrics["objective/tis_weight_mean"] = reduce(batch.masked(tis[0])).item() / normalizer
                metrics["objective/tis_clip_frac"] = reduce(tis[1].float()).item() / normalizer
            if kl_tokens is not None:
                kl = reduce(kl_tokens).item() / normalizer
                metrics["objective/kl"] = kl
                metrics["loss/kl"] = self.kl.coef * kl
        return loss, metrics

    def _tis_weights(self, batch: ObjectiveBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """([N,T] min(pi_old / pi_rollout, tis_cap), 1 off the response; [N,T] bool: tokens that hit the cap)."""
        if batch.rollout_logprobs is None:
            raise ValueError("objective.tis_cap: the batch has no rollout_logprobs (the engine's log-probs)")
        log_w = batch.masked(batch.old_logprobs.float() - batch.rollout_logprobs.float())
        capped = batch.token_mask() & (log_w > math.log(self.cfg.tis_cap))
        return torch.exp(log_w).clamp(max=self.cfg.tis_cap).detach(), capped


class GRPO(PolicyGradient):
    """GRPO: sequence-level loss, symmetric clipping, every group trained."""

    name = "grpo"


class DAPO(PolicyGradient):
    """DAPO: token-level loss, clip-higher, dynamic sampling (overlong shaping via objective.overlong_buffer)."""

    name = "dapo"
    default_clip_eps_high = 0.28
    default_token_level_loss = True
    default_dynamic_sampling = True


def _first_set(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)
