"""mismatch_metrics on hand-computed values, list and padded inputs, and its errors."""
import math

import pytest
import torch

from megatron_rence.rollout.mismatch import mismatch_metrics


def test_hand_computed_lists():
    rollout = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    trainer = [torch.tensor([-1.1, -1.8]), torch.tensor([-0.5])]
    # d = trainer - rollout = [-0.1, 0.2, 0.0]
    m = mismatch_metrics(rollout, trainer)
    assert m["mismatch/abs_mean"] == pytest.approx(0.1)
    assert m["mismatch/abs_max"] == pytest.approx(0.2)
    k3 = ((math.exp(-0.1) - 1 + 0.1) + (math.exp(0.2) - 1 - 0.2) + 0.0) / 3
    assert m["mismatch/kl"] == pytest.approx(k3)
    assert m["mismatch/kl_k1"] == pytest.approx((0.1 - 0.2 + 0.0) / 3)


def test_padded_with_mask_equals_lists():
    rollout = torch.tensor([[-1.0, -2.0, 9.0], [-0.5, 7.0, 7.0]])
    trainer = torch.tensor([[-1.1, -1.8, -9.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    padded = mismatch_metrics(rollout, trainer, mask)
    lists = mismatch_metrics([torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])],
                             [torch.tensor([-1.1, -1.8]), torch.tensor([-0.5])])
    assert padded == pytest.approx(lists)


def test_identical_is_zero_and_empty_is_zero():
    x = [torch.randn(5), torch.randn(3)]
    assert mismatch_metrics(x, [t.clone() for t in x]) == {
        "mismatch/abs_mean": 0.0, "mismatch/abs_max": 0.0, "mismatch/kl": 0.0, "mismatch/kl_k1": 0.0}
    assert mismatch_metrics([], [])["mismatch/abs_mean"] == 0.0


def test_kl_k3_is_nonnegative():
    torch.manual_seed(0)
    rollout = [torch.randn(50)]
    trainer = [rollout[0] + 0.3 * torch.randn(50)]
    assert mismatch_metrics(rollout, trainer)["mismatch/kl"] > 0


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="sequence 1 has 2 rollout"):
        mismatch_metrics([torch.zeros(1), torch.zeros(2)], [torch.zeros(1), torch.zeros(3)])
    with pytest.raises(ValueError, match="2 rollout sequences vs 1"):
        mismatch_metrics([torch.zeros(1), torch.zeros(2)], [torch.zeros(1)])
    with pytest.raises(ValueError, match="mask"):
        mismatch_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
