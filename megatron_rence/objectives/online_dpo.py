"""Online DPO: preference pairs (positive, negative) drawn from each group, sigmoid DPO loss against a reference.

For a pair (p, n) of one prompt's completions, with sequence log-likelihoods lp (trained policy) and
ref (reference policy):
    l_pn = -log sigmoid( beta * ((lp_p - ref_p) - (lp_n - ref_n)) )
summed over this microbatch's pairs / number of pairs in the global batch. Pairs are chosen
deterministically by `groups.pair_indices` (positives and negatives in row order, at most
objective.max_pairs_per_group per group, 0 = all |P|*|N|); since the engine's sample order is random,
taking the first pairs is an unbiased draw. With objective.length_normalize the log-likelihoods are means
over tokens. Semi-online DPO (the paper's baseline) refreshes the reference every objective.ref_update_every
steps: that is the trainer's job (it owns the reference weights); old_logprobs are not used here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_rence.objectives.base import Lengths, ObjectiveBase, ObjectiveBatch, Prepared
from megatron_rence.objectives.groups import contrastive_groups, group_metrics, group_pairs, num_pairs, positives


class OnlineDPO(ObjectiveBase):
    """Sigmoid DPO on within-group pairs; reads beta, max_pairs_per_group, length_normalize, positive_threshold."""

    name = "online_dpo"

    @property
    def needs_ref(self) -> bool:
        return True

    def prepare(self, rewards: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int) -> Prepared:
        """Keep groups with at least one positive and one negative (the only ones that yield pairs)."""
        rewards = rewards.float()
        is_pos = positives(rewards, self.cfg.positive_threshold)
        keep = contrastive_groups(is_pos)
        metrics = group_metrics(is_pos, keep)
        metrics["objective/pairs_per_group"] = (
            num_pairs(is_pos[keep], self.cfg.max_pairs_per_group).float().mean().item() if keep.any() else 0.0)
        metrics.update(self.kl_metrics())
        return Prepared(rewards, keep, lengths, metrics)

    def normalizer_for(self, rewards: torch.Tensor, lengths: Lengths) -> float:
        """Number of pairs the groups yield, at least 1."""
        is_pos = positives(rewards, self.cfg.positive_threshold)
        return max(float(num_pairs(is_pos, self.cfg.max_pairs_per_group).sum().item()), 1.0)

    def __call__(self, batch: ObjectiveBatch, normalizer: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the pairs' DPO losses (+ k3 KL per sequence if kl_coef > 0) / normalizer."""
        assert normalizer > 0, f"normalizer must be > 0, got {normalizer}"
        if batch.ref_logprobs is None:
            raise ValueError("online_dpo needs ref_logprobs in the batch (the reference policy's log-probs)")
        is_pos = positives(batch.grouped(batch.rewards.float()), self.cfg.positive_threshold)
        chosen, rejected = group_pairs(is_pos, self.cfg.max_pairs_per_group)
        chosen, rejected = chosen.to(batch.logprobs.device), rejected.to(batch.logprobs.device)
        log_ratio = (batch.sequence_logprobs(self.cfg.length_normalize)
                     - batch.ref_sequence_logprobs(self.cfg.length_normalize))  # [N] implicit rewards / beta
        margin = self.cfg.beta * (log_ratio[chosen] - log_ratio[rejected])  # [num_pairs]
        pair_loss = -F.logsigmoid(margin)
        loss = pair_loss.sum()
        metrics: dict[str, float] = {}
        if self.has_kl:
            # KL on the paired sequences only, one term per pair member, so its unit is the pair too.
            kl_seq = batch.kl_per_sequence()
            kl_sum = 0.5 * (kl_seq[chosen] + kl_seq[rejected]).sum()
            loss = loss + self.kl.coef * kl_sum
            metrics["objective/kl"] = kl_sum.item() / normalizer
            metrics["loss/kl"] = self.kl.coef * kl_sum.item() / normalizer
        loss = loss / normalizer
        with torch.no_grad():
            metrics.update({
                "loss/online_dpo": loss.item(),
                "objective/num_pairs": float(chosen.numel()),
                "objective/reward_accuracy": (margin > 0).float().sum().item() / normalizer,
                "objective/reward_margin": margin.sum().item() / normalizer,
                "objective/num_positives": float((is_pos & contrastive_groups(is_pos).unsqueeze(1)).sum().item()),
            })
        return loss, metrics
