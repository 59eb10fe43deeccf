"""Online DPO: deterministic pair choice, hand-computed sigmoid loss and gradient, normalizer = pairs."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives import ObjectiveBatch, get_objective
from megatron_rence.objectives.groups import group_pairs, num_pairs, pair_indices


def dpo(**kw):
    return get_objective(ObjectiveConfig(name="online_dpo", **kw))


def batch(logprobs, ref, rewards, k=None):
    lp = torch.tensor(logprobs, dtype=torch.float32).requires_grad_(True)
    ref_t = torch.tensor(ref, dtype=torch.float32)
    mask = torch.ones_like(lp, dtype=torch.bool)
    old = torch.full_like(lp, float("nan"))  # DPO never reads old_logprobs
    return ObjectiveBatch(lp, old, mask, torch.tensor(rewards, dtype=torch.float32), k or len(rewards), ref_t)


def test_pair_order():
    # ordered by shift (b - a) mod |N|, then a: shift 0 -> (0,0), (1,1); shift 1 -> (0,1), (1,2); shift 2 -> (0,2), (1,0)
    assert pair_indices(2, 3, 0) == [(0, 0), (1, 1), (0, 1), (1, 2), (0, 2), (1, 0)]
    assert pair_indices(2, 3, 3) == [(0, 0), (1, 1), (0, 1)]
    assert pair_indices(3, 1, 2) == [(0, 0), (1, 0)]
    assert pair_indices(0, 3, 5) == [] and pair_indices(2, 0, 5) == []
    for p, n in [(1, 1), (3, 2), (2, 5), (4, 4)]:
        assert len(set(pair_indices(p, n, 0))) == p * n


def test_group_pairs_row_indices():
    # group 0 = rows 0..3 with positives rows 1, 3 and negatives 0, 2; group 1 = rows 4..7, positive row 6.
    is_pos = torch.tensor([[False, True, False, True], [False, False, True, False]])
    chosen, rejected = group_pairs(is_pos, max_pairs=2)
    assert chosen.tolist() == [1, 3, 6, 6] and rejected.tolist() == [0, 2, 4, 5]
    assert num_pairs(is_pos, 2).tolist() == [2, 2]
    assert num_pairs(is_pos, 0).tolist() == [4, 3]


def test_loss_value_and_gradient():
    # one pair: lp_p = 1.25 + 0.75 = 2, ref_p = 1 -> 1; lp_n = -1 + 0.5 = -0.5, ref_n = 0.5 -> -1;
    # beta 0.5 -> margin 0.5 * (1 - (-1)) = 1.
    # loss = -log sigmoid(1) = log(1 + e^-1); d loss / d lp_p = -beta * sigmoid(-1), d / d lp_n = +beta * sigmoid(-1).
    b = batch([[1.25, 0.75], [-1.0, 0.5]], [[0.5, 0.5], [0.25, 0.25]], [1, 0])
    loss, metrics = dpo(beta=0.5)(b, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    g = 0.5 / (1 + math.e)  # beta * sigmoid(-1)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-g, -g], [g, g]]))
    assert metrics["objective/reward_accuracy"] == 1.0
    assert metrics["objective/reward_margin"] == pytest.approx(1.0)
    assert metrics["objective/num_pairs"] == 1.0


def test_length_normalize_and_normalizer():
    # length_normalize: per-token means; lp_p mean 0.5, lp_n mean -0.5, refs 0 -> margin beta * 1 = 1.
    b = batch([[0.25, 0.75], [-1.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [1, 0])
    loss, _ = dpo(beta=1.0, length_normalize=True)(b, 4.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)) / 4, rel=1e-6)


def test_all_pairs_of_a_group():
    # rewards [1, 0, 1, 0]: P = rows 0, 2; N = rows 1, 3; log-ratios (ref = 0) [2, 0, 1, 1], beta 1.
    # pairs (0,1): 2; (2,3): 0; (0,3): 1; (2,1): 1 -> mean of -log sigmoid over the 4 pairs.
    lp = [[2.0], [0.0], [1.0], [1.0]]
    obj = dpo(max_pairs_per_group=0)
    rewards = torch.tensor([[1., 0, 1, 0]])
    norm = obj.normalizer_for(rewards, [1] * 4)
    assert norm == 4.0
    loss, _ = obj(batch(lp, [[0.0]] * 4, [1, 0, 1, 0]), norm)
    expected = sum(math.log1p(math.exp(-m)) for m in (2.0, 0.0, 1.0, 1.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    obj1 = dpo(max_pairs_per_group=1)  # only (row 0, row 1)
    assert obj1.normalizer_for(rewards, [1] * 4) == 1.0
    assert obj1(batch(lp, [[0.0]] * 4, [1, 0, 1, 0]), 1.0)[0].item() == pytest.approx(math.log1p(math.exp(-2)), rel=1e-6)


def test_needs_ref_and_prepare():
    obj = dpo()
    assert obj.needs_ref
    with pytest.raises(ValueError, match="ref_logprobs"):
        b = batch([[0.0], [0.0]], [[0.0], [0.0]], [1, 0])
        obj(ObjectiveBatch(b.logprobs, b.old_logprobs, b.mask, b.rewards, 2, None), 1.0)
    p = obj.prepare(torch.tensor([[1., 0], [1, 1], [0, 0]]), torch.ones(3, 2, dtype=torch.long), 8)
    assert p.keep.tolist() == [True, False, False]
    assert obj.normalizer(p) == 1.0
