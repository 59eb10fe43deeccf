"""ReNCE: online multi-label noise contrastive estimation over each prompt's verified positives and negatives.

Where each piece comes from (docs/design.md, "ReNCE loss"). The paper (arXiv 2601.22432) could be read here only
up to its abstract and the first paragraphs of its introduction; its method section was not readable.
  ABSTRACT: per prompt the K outcomes are split into a positive and a negative set (by the verifier here), the
    likelihood of the positives is maximised, and the approach is described as an online instance of
    (multi-label) noise contrastive estimation. The abstract positions it as an alternative to GRPO's
    refinements (asymmetric clipping, zero-variance filtering, which "require significant empirical insight");
    whether any of them would help ReNCE is not something it states, so none is excluded here.
  AUTHORS' EARLIER CODE (EntQA, `sum_log_nce`; that ReNCE keeps this form is our inference): each positive is
  contrasted with the negatives only, never with the other positives:
          L(x) = sum_{p in P} -log( exp(s_p) / (exp(s_p) + sum_{n in N} exp(s_n)) )
  SECONDARY SUMMARIES of the full paper (machine summaries; the forms and values below are ours):
    - score = log-ratio to the policy that sampled the rollouts (the classic NCE logit log p_theta - log q):
          s_k = beta * sum_t mask * (log pi_theta - log pi_old)          [objective.beta]
      divided by the response length with objective.length_normalize (our option);
    - a reward-scaled margin with an adaptive size (alpha) on the positives. Our rule, the paper's being
      unknown: m_p = margin_alpha * (r_p - mean_{n in N} r_n), subtracted from s_p. With the verifier's 0/1
      rewards it is the same constant alpha * (correct - incorrect) for every positive; it still changes the
      loss (docs/design.md works it out);
    - a KL penalty to a reference policy whose coefficient adapts over a window: ours is k3 per token, mean
      over a sequence's tokens, mean over the group, coefficient objective.kl_coef moved towards
      objective.kl_target with time constant objective.kl_window (kl.AdaptiveKLController);
    - dynamic prompt filtering with hard negatives: groups whose positive fraction exceeds objective.t_easy
      are dropped (prepare); objective.hard_negative_samples over-samples and keeps the negatives most likely
      under the sampling policy (groups.hard_negative_selection; our reading);
    - sensitivity to t_easy, alpha and beta; Qwen3-4B on DAPO-Math + MATH; six benchmarks.
  OUR CHOICES: mean (default) or sum over positives (objective.reduce_positives); the normalisation below.
  ALWAYS: groups without a positive or without a negative give no gradient (prepare drops them, and the loss
  gives them exactly zero weight if they reach it); the loss is the mean over those usable groups of the
  global batch (normalizer = number of usable groups).

Per positive p, with m_p the margin and LSE_N = logsumexp_{n in N} s_n, the term is computed stably as
    -log( exp(s_p - m_p) / (exp(s_p - m_p) + sum_n exp(s_n)) ) = softplus(LSE_N - s_p + m_p).
At theta = theta_old without margin (all s = 0), in the sum form, d L / d s_p = -|N|/(1+|N|) for each positive
and d L / d s_n = +|P|/(1+|N|) for each negative; times beta for the sequence log-likelihoods.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives.base import Lengths, ObjectiveBase, ObjectiveBatch, Prepared
from megatron_rence.objectives.groups import contrastive_groups, group_metrics, positives, too_easy


class ReNCE(ObjectiveBase):
    """The ReNCE loss; reads beta, margin_alpha, reduce_positives, length_normalize, t_easy, kl_*."""

    name = "rence"

    def __init__(self, cfg: ObjectiveConfig):
        super().__init__(cfg)
        if cfg.margin_alpha < 0:
            raise ValueError(f"objective.margin_alpha must be >= 0, got {cfg.margin_alpha}")
        if not 0.0 <= cfg.t_easy <= 1.0:
            raise ValueError(f"objective.t_easy must be in [0, 1], got {cfg.t_easy}")

    def prepare(self, rewards: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Prepared:
        """Keep groups with both positives and negatives whose positive fraction is <= t_easy."""
        rewards = rewards.float()
        is_pos = positives(rewards, self.cfg.positive_threshold)
        contrast = contrastive_groups(is_pos)
        easy = contrast & too_easy(is_pos, self.cfg.t_easy)
        keep = contrast & ~easy
        metrics = group_metrics(is_pos, keep)
        metrics["groups/dropped_easy_frac"] = easy.float().sum().item() / max(len(keep), 1)
        metrics.update(self.kl_metrics())
        return Prepared(rewards, keep, lengths, metrics)

    def normalizer_for(self, rewards: torch.Tensor, lengths: Lengths) -> float:
        """Number of usable groups (>= 1 positive and >= 1 negative), at least 1."""
        usable = contrastive_groups(positives(rewards, self.cfg.positive_threshold))
        return max(float(usable.sum().item()), 1.0)

    def scores(self, batch: ObjectiveBatch) -> torch.Tensor:
        """[N] s_k = beta * sum_t (logprobs - old_logprobs) over response tokens (/ length if length_normalize);
        with objective.score_against=current the old log-probs are this step's own, detached (s_k = 0)."""
        if self.cfg.score_against == "current":  # pi_old := this step's policy, detached: s = 0, same gradient
            lp = batch.logprobs.float()
            s = batch.masked(lp - lp.detach()).sum(dim=1)
        else:
            s = batch.log_ratio().sum(dim=1)
        if self.cfg.length_normalize:
            s = s / batch.lengths().clamp(min=1.0)
        return self.cfg.beta * s

    def margins(self, rewards: torch.Tensor, is_pos: torch.Tensor) -> torch.Tensor:
        """[G,K] m_p = margin_alpha * (r_p - mean of the group's negative rewards) for positives, 0 elsewhere."""
        is_neg = (~is_pos).float()
        neg_mean = (rewards * is_neg).sum(dim=1, keepdim=True) / is_neg.sum(dim=1, keepdim=True).clamp(min=1.0)
        return self.cfg.margin_alpha * (rewards - neg_mean) * is_pos.float()

    def __call__(self, batch: ObjectiveBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum over this microbatch's usable groups of the group's NCE loss (+ KL), divided by `normalizer`."""
        assert normalizer > 0, f"normalizer must be > 0, got {normalizer}"
        s = batch.grouped(self.scores(batch))  # [G,K]
        rewards = batch.grouped(batch.rewards.float())
        is_pos = positives(rewards, self.cfg.positive_threshold)
        usable = contrastive_groups(is_pos)  # [G]
        neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
        neg_scores = torch.where(~is_pos, s, neg_inf)
        # A group without negatives gets a finite dummy row: logsumexp of all -inf has a NaN gradient.
        neg_scores = torch.where(usable.unsqueeze(1), neg_scores, torch.zeros_like(s))
        lse_neg = torch.logsumexp(neg_scores, dim=1, keepdim=True)  # [G,1]
        terms = F.softplus(lse_neg - (s - self.margins(rewards, is_pos)))  # [G,K]; used only for positives
        is_pos_used = (is_pos & usable.unsqueeze(1)).float()
        num_pos = is_pos_used.sum(dim=1, keepdim=True)
        weights = is_pos_used / num_pos.clamp(min=1.0) if self.cfg.reduce_positives == "mean" else is_pos_used
        nce = (terms * weights).sum()
        loss = nce
        metrics: dict[str, float] = {}
        if self.has_kl:
            kl_groups = batch.grouped(batch.kl_per_sequence()).mean(dim=1) * usable.float()  # [G]
            kl_sum = kl_groups.sum()
            loss = loss + self.kl.coef * kl_sum
            metrics["objective/kl"] = kl_sum.item() / normalizer
            metrics["loss/kl"] = self.kl.coef * kl_sum.item() / normalizer
        loss = loss / normalizer
        with torch.no_grad():
            pos_prob = (torch.exp(-terms) * is_pos_used).sum(dim=1) / num_pos.squeeze(1).clamp(min=1.0)
            is_neg = (~is_pos & usable.unsqueeze(1)).float()
            pos_mean = (s * is_pos_used).sum(dim=1) / num_pos.squeeze(1).clamp(min=1.0)
            neg_mean = (s * is_neg).sum(dim=1) / is_neg.sum(dim=1).clamp(min=1.0)
            metrics.update({
                "loss/rence": loss.item(),
                "loss/nce": nce.item() / normalizer,
                "objective/num_groups": float(usable.sum().item()),
                "objective/num_positives": float(num_pos.sum().item()),
                "objective/num_negatives": float(is_neg.sum().item()),
                "objective/pos_prob": (pos_prob * usable.float()).sum().item() / normalizer,
                "objective/score_gap": ((pos_mean - neg_mean) * usable.float()).sum().item() / normalizer,
            })
        return loss, metrics
