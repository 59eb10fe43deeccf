"""One step's experience: prompts, their K completions and grades, as the trainer and the metrics need them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_rence.data.prompts import Prompt
from megatron_rence.objectives.groups import contrastive_groups, hard_negative_selection
from megatron_rence.rewards.math import GradeResult, fallback_fractions
from megatron_rence.rollout.types import Completion


@dataclass
class Experience:
    """G prompts x K completions, graded. Row-major: sequence i = group i // K, sample i % K."""

    prompts: list[Prompt]
    completions: list[list[Completion]]  # [G][K]
    grades: list[list[GradeResult]]  # [G][K]

    @property
    def group_size(self) -> int:
        return len(self.completions[0])

    @property
    def rewards(self) -> torch.Tensor:
        """[G, K] float32."""
        return torch.tensor([[g.reward for g in row] for row in self.grades], dtype=torch.float32)

    @property
    def lengths(self) -> torch.Tensor:
        """[G, K] response lengths in tokens."""
        return torch.tensor([[len(c.token_ids) for c in row] for row in self.completions], dtype=torch.long)

    def select(self, keep: torch.Tensor) -> "Experience":
        """The groups where `keep` [G] is True."""
        idx = [i for i, k in enumerate(keep.tolist()) if k]
        return Experience([self.prompts[i] for i in idx], [self.completions[i] for i in idx],
                          [self.grades[i] for i in idx])

    def take(self, index: torch.Tensor) -> "Experience":
        """Per group g, the samples index[g] ([G,k] long), in that order."""
        rows = index.tolist()
        return Experience(self.prompts, [[c[j] for j in r] for c, r in zip(self.completions, rows)],
                          [[g[j] for j in r] for g, r in zip(self.grades, rows)])

    def mean_rollout_logprobs(self) -> torch.Tensor:
        """[G, K] each completion's mean per-token log-prob under the sampling policy (-inf when empty)."""
        return torch.tensor([[sum(c.logprobs) / len(c.logprobs) if c.logprobs else float("-inf") for c in row]
                             for row in self.completions], dtype=torch.float32)

    def sequences(self) -> list[tuple[list[int], int]]:
        """(prompt + response token ids, prompt length) per sequence, row-major."""
        return [(p.token_ids + c.token_ids, len(p.token_ids))
                for p, row in zip(self.prompts, self.completions) for c in row]

    def rollout_logprobs(self) -> list[torch.Tensor]:
        return [torch.tensor(c.logprobs, dtype=torch.float32) for row in self.completions for c in row]


def rollout_metrics(exp: Experience, positive_threshold: float) -> dict[str, float]:
    """reward/*, groups/*, rollout/* metrics of a graded batch."""
    rewards, lengths = exp.rewards, exp.lengths.float()
    positive = rewards >= positive_threshold
    num_pos = positive.sum(dim=1)
    k = rewards.shape[1]
    statuses = [g.status for row in exp.grades for g in row]
    finished = [c.finish_reason for row in exp.completions for c in row]
    total = max(len(statuses), 1)
    fallback = fallback_fractions([g for row in exp.grades for g in row], positive_threshold)
    return {
        "reward/mean": rewards.mean().item(),
        "reward/pass_rate": positive.float().mean().item(),
        "reward/pass_at_k": (num_pos > 0).float().mean().item(),
        "reward/no_answer_frac": statuses.count("no_answer") / total,
        "reward/timeout_frac": statuses.count("timeout") / total,
        "reward/error_frac": statuses.count("error") / total,
        "reward/fallback_frac": fallback["fallback_frac"],  # answers found without \boxed{} (reward.fallbacks)
        "reward/correct_fallback_frac": fallback["correct_fallback_frac"],
        "groups/mixed_frac": ((num_pos > 0) & (num_pos < k)).float().mean().item(),
        "groups/all_correct_frac": (num_pos == k).float().mean().item(),
        "groups/all_wrong_frac": (num_pos == 0).float().mean().item(),
        "rollout/response_len_mean": lengths.mean().item(),
        "rollout/response_len_max": lengths.max().item(),
        "rollout/truncated_frac": finished.count("length") / total,
        "rollout/num_sequences": float(total),
    }


def keep_hard_negatives(exp: Experience, k: int, positive_threshold: float) -> tuple[Experience, dict[str, float]]:
    """K' -> k samples per group: the sampled positive fraction, the negatives most likely under the sampling
    policy (objectives.groups.hard_negative_selection, objective.hard_negative_samples); metrics compare the
    kept negatives' mean per-token log-prob with that of all sampled negatives."""
    is_pos = exp.rewards >= positive_threshold
    hardness = exp.mean_rollout_logprobs()
    index = hard_negative_selection(is_pos, hardness, k)
    kept = torch.zeros_like(is_pos).scatter_(1, index, True)
    usable = contrastive_groups(is_pos).unsqueeze(1) & torch.isfinite(hardness)
    neg_all, neg_kept = usable & ~is_pos, usable & ~is_pos & kept
    metrics = {}
    if neg_kept.any():
        metrics["groups/hard_neg_logprob_kept"] = hardness[neg_kept].mean().item()
        metrics["groups/hard_neg_logprob_all"] = hardness[neg_all].mean().item()
    return exp.take(index), metrics
