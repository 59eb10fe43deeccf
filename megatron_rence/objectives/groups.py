"""Group helpers: positive/negative split, group filters, hard negatives, advantages, overlong shaping, DPO pairs.

All functions are pure torch on [G,K] tensors (G groups of K completions of one prompt).
"""
from __future__ import annotations

import math

import torch

from megatron_rence.config import max_positives_kept


def positives(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """[G,K] bool: reward >= threshold (the verifier's positives)."""
    return rewards >= threshold


def contrastive_groups(is_positive: torch.Tensor) -> torch.Tensor:
    """[G] bool: groups with at least one positive and one negative (the only ones a contrast can use)."""
    return is_positive.any(dim=1) & (~is_positive).any(dim=1)


def positive_fraction(is_positive: torch.Tensor) -> torch.Tensor:
    """[G] float32 fraction of positives per group."""
    return is_positive.float().mean(dim=1)


def too_easy(is_positive: torch.Tensor, t_easy: float) -> torch.Tensor:
    """[G] bool: groups whose positive fraction exceeds t_easy (ReNCE's easy-prompt filter), as integer counts."""
    return is_positive.sum(dim=1) > max_positives_kept(t_easy, is_positive.shape[1])


def all_equal(rewards: torch.Tensor) -> torch.Tensor:
    """[G] bool: groups whose rewards are all the same (zero variance; includes K=1)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: torch.Tensor, normalize_std: bool, eps: float = 1e-6) -> torch.Tensor:
    """[G,K] GRPO advantages (r - mean_group) / (std_group + eps), or r - mean_group without normalize_std.

    std is the unbiased (K-1) group standard deviation; a group of one sample (K=1) has advantage 0.
    """
    rewards = rewards.float()
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """[G,K] DAPO soft overlong punishment, added to the rewards.

    With L_max = max_new_tokens and a buffer of B tokens: 0 for L <= L_max - B, then a linear ramp
    ((L_max - B) - L) / B * penalty down to -penalty at L = L_max, and -penalty beyond. buffer=0: all zeros.
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    start = max_new_tokens - buffer
    ramp = (start - lengths.float()) / buffer * penalty
    return ramp.clamp(min=-penalty, max=0.0)


def pair_indices(num_positives: int, num_negatives: int, max_pairs: int) -> list[tuple[int, int]]:
    """Deterministic (a, b) pairs: the a-th positive with the b-th negative (indices in row order).

    All |P|*|N| pairs are ordered by shift = (b - a) mod |N|, then by a; the first `max_pairs` are used
    (max_pairs <= 0: all). Shift 0 pairs positive a with negative a mod |N|, so the first pairs use every
    positive once and spread over the negatives before any pair repeats a positive.
    """
    if num_positives == 0 or num_negatives == 0:
        return []
    total = num_positives * num_negatives
    count = total if max_pairs <= 0 else min(max_pairs, total)
    pairs = []
    for i in range(count):
        shift, a = divmod(i, num_positives)
        pairs.append((a, (a + shift) % num_negatives))
    return pairs


def num_pairs(is_positive: torch.Tensor, max_pairs: int) -> torch.Tensor:
    """[G] number of DPO pairs each group yields."""
    num_pos = is_positive.sum(dim=1)
    total = num_pos * (is_positive.shape[1] - num_pos)
    return total if max_pairs <= 0 else total.clamp(max=max_pairs)


def group_pairs(is_positive: torch.Tensor, max_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (into the flattened [G*K] batch) of chosen / rejected for every pair: two [num_pairs] long."""
    chosen, rejected = [], []
    k = is_positive.shape[1]
    for g, row in enumerate(is_positive.tolist()):
        pos = [g * k + j for j, p in enumerate(row) if p]
        neg = [g * k + j for j, p in enumerate(row) if not p]
        for a, b in pair_indices(len(pos), len(neg), max_pairs):
            chosen.append(pos[a])
            rejected.append(neg[b])
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)


def group_metrics(is_positive: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
    """groups/* counts of a rollout batch and its kept fraction."""
    num_groups = max(is_positive.shape[0], 1)
    num_pos = is_positive.sum(dim=1)
    k = is_positive.shape[1]
    return {
        "groups/kept_frac": keep.float().sum().item() / num_groups,
        "groups/num_kept": float(keep.sum().item()),
        "groups/all_positive_frac": (num_pos == k).float().sum().item() / num_groups,
        "groups/all_negative_frac": (num_pos == 0).float().sum().item() / num_groups,
    }


def hard_negative_selection(is_positive: torch.Tensor, hardness: torch.Tensor, k: int) -> torch.Tensor:
    """[G,k] long: which k of each group's K' >= k samples to keep (ascending sample order).

    Our reading of the summaries' "hard negatives" (objective.hard_negative_samples): over-sample, then keep
    the negatives the policy finds most likely. In a group with P' positives and N' negatives out of K',
    n_pos = floor(k * P' / K' + 1/2) clipped to [1, k-1] positives are kept (the first ones in sampling
    order, so the kept group has the positive fraction that was sampled) and k - n_pos negatives with the
    highest `hardness` [G,K'] (ties: earlier sample first). Since k <= K', 1 <= n_pos <= P' and
    k - n_pos <= N' always hold. A group without a positive or without a negative keeps its first k samples
    (the contrastive objectives drop it either way).
    """
    g, k_big = is_positive.shape
    assert hardness.shape == (g, k_big) and 1 <= k <= k_big, (tuple(hardness.shape), k, k_big)
    rows = []
    for pos_row, hard_row in zip(is_positive.tolist(), hardness.tolist()):
        pos = [j for j, p in enumerate(pos_row) if p]
        neg = [j for j, p in enumerate(pos_row) if not p]
        if not pos or not neg:
            rows.append(list(range(k)))
            continue
        n_pos = min(max(math.floor(k * len(pos) / k_big + 0.5), 1), k - 1)
        hardest = sorted(neg, key=lambda j: (-hard_row[j], j))[:k - n_pos]
        assert n_pos <= len(pos) and len(hardest) == k - n_pos
        rows.append(sorted(pos[:n_pos] + hardest))
    return torch.tensor(rows, dtype=torch.long).reshape(g, k)
