"""Invariants every objective must satisfy: registry, microbatch split == whole batch, permutation within a group,
degenerate groups, gradient direction after one SGD step on free logits, state round trip."""
from __future__ import annotations

import math
import typing

import pytest
import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives import OBJECTIVES, ObjectiveBatch, get_objective
from megatron_rence.objectives.groups import positives

NAMES = ["rence", "grpo", "dapo", "online_dpo"]


def cfg_for(name: str, **kw) -> ObjectiveConfig:
    base = dict(name=name, kl_coef=0.05)
    if name == "online_dpo":
        base["max_pairs_per_group"] = 0  # all pairs: a subset choice depends on row order by design
    if name == "rence":
        base["margin_alpha"] = 0.3
    base.update(kw)
    return ObjectiveConfig(**base)


def random_batch(rewards: torch.Tensor, seed: int = 0, t: int = 7, junk_off_mask: bool = False):
    """Tensors for G x K rewards: per-token logprobs (leaf, grad), old, ref, mask with varied lengths."""
    g, k = rewards.shape
    gen = torch.Generator().manual_seed(seed)
    n = g * k
    lengths = torch.randint(1, t + 1, (n,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    lp = -torch.rand(n, t, generator=gen) * 2.0
    old = lp + 0.3 * torch.randn(n, t, generator=gen)
    ref = lp + 0.3 * torch.randn(n, t, generator=gen)
    if junk_off_mask:  # padding may hold anything: nothing off the mask may leak into loss or gradient
        lp = torch.where(mask, lp, torch.tensor(float("nan")))
        old = torch.where(mask, old, torch.tensor(float("inf")))
        ref = torch.where(mask, ref, torch.tensor(float("-inf")))
    return lp.requires_grad_(True), old, ref, mask, lengths


def loss_and_grad(obj, lp, old, ref, mask, rewards_flat, k, normalizer):
    lp = lp.detach().clone().requires_grad_(True)
    loss, metrics = obj(ObjectiveBatch(lp, old, mask, rewards_flat, k, ref), normalizer)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def test_registry_covers_every_config_choice():
    hints = typing.get_type_hints(ObjectiveConfig)
    choices = typing.get_args(hints["name"])
    assert set(OBJECTIVES) == set(choices)
    for name in choices:
        obj = get_objective(ObjectiveConfig(name=name))
        assert obj.name == name and isinstance(obj, OBJECTIVES[name])
    with pytest.raises(ValueError, match="objective.name"):
        get_objective(ObjectiveConfig(name="ppo"))  # type: ignore[arg-type]


def test_positive_threshold_is_inclusive():
    is_pos = positives(torch.tensor([[0.5, 0.49, 1.0]]), 0.5)
    assert is_pos.tolist() == [[True, False, True]]


def test_needs_ref():
    assert not get_objective(ObjectiveConfig(name="rence")).needs_ref
    assert not get_objective(ObjectiveConfig(name="grpo")).needs_ref
    assert get_objective(ObjectiveConfig(name="grpo", kl_coef=0.1)).needs_ref
    assert get_objective(ObjectiveConfig(name="rence", kl_coef=0.1, kl_target=0.05)).needs_ref
    assert get_objective(ObjectiveConfig(name="online_dpo")).needs_ref


@pytest.mark.parametrize("name", NAMES)
def test_microbatch_split_equals_whole_batch(name):
    obj = get_objective(cfg_for(name))
    rewards = torch.tensor([[1., 0, 0, 1], [0, 0, 1, 0], [1, 1, 1, 0], [0, 1, 0, 0.]])
    k = rewards.shape[1]
    lp, old, ref, mask, lengths = random_batch(rewards, seed=1)
    prepared = obj.prepare(rewards, lengths.reshape(rewards.shape), max_new_tokens=7)
    assert prepared.keep.all()
    norm = obj.normalizer(prepared)
    assert norm == obj.normalizer_for(prepared.rewards, lengths.tolist())
    flat = prepared.rewards.reshape(-1)
    whole_loss, whole_grad, whole_metrics = loss_and_grad(obj, lp, old, ref, mask, flat, k, norm)
    grad = torch.zeros_like(whole_grad)
    loss_sum, metric_sums = 0.0, {}
    for groups in ([0], [1, 2], [3]):
        rows = torch.cat([torch.arange(g * k, (g + 1) * k) for g in groups])
        loss, g_rows, metrics = loss_and_grad(obj, lp[rows], old[rows], ref[rows], mask[rows], flat[rows], k, norm)
        grad[rows] += g_rows
        loss_sum += loss.item()
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0.0) + value
    assert whole_grad.abs().sum() > 0
    torch.testing.assert_close(grad, whole_grad, rtol=1e-5, atol=1e-7)
    assert loss_sum == pytest.approx(whole_loss.item(), rel=1e-5)
    assert set(metric_sums) == set(whole_metrics)
    for key, value in whole_metrics.items():  # metrics are additive over microbatches (base.py contract)
        assert metric_sums[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("name", NAMES)
def test_permutation_within_group(name):
    obj = get_objective(cfg_for(name))
    rewards = torch.tensor([[1., 0, 0, 1, 0], [0, 1, 0, 0, 1.]])
    k = rewards.shape[1]
    lp, old, ref, mask, lengths = random_batch(rewards, seed=2)
    norm = obj.normalizer_for(rewards, lengths.tolist())
    loss, grad, _ = loss_and_grad(obj, lp, old, ref, mask, rewards.reshape(-1), k, norm)
    perm = torch.cat([torch.tensor([3, 0, 4, 2, 1]), torch.tensor([1, 4, 0, 3, 2]) + k])
    p_loss, p_grad, _ = loss_and_grad(obj, lp[perm], old[perm], ref[perm], mask[perm],
                                      rewards.reshape(-1)[perm], k, norm)
    assert p_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(p_grad, grad[perm], rtol=1e-5, atol=1e-7)


DEGENERATE = {
    "all_positive": torch.tensor([[1., 1, 1, 1]]),
    "all_negative": torch.tensor([[0., 0, 0, 0]]),
    "k1": torch.tensor([[1.], [0.]]),
}
# Which degenerate groups `prepare` keeps: GRPO trains every group (its advantages are 0 there).
KEEPS_DEGENERATE = {"rence": False, "grpo": True, "dapo": False, "online_dpo": False}


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_groups_no_gradient_no_nan(name, case):
    rewards = DEGENERATE[case]
    obj = get_objective(cfg_for(name, kl_coef=0.0))
    k = rewards.shape[1]
    lp, old, ref, mask, lengths = random_batch(rewards, seed=3, junk_off_mask=True)
    prepared = obj.prepare(rewards, lengths.reshape(rewards.shape), max_new_tokens=7)
    assert prepared.keep.tolist() == [KEEPS_DEGENERATE[name]] * rewards.shape[0]
    norm = obj.normalizer_for(rewards, lengths.tolist())
    assert norm >= 1.0
    loss, grad, metrics = loss_and_grad(obj, lp, old, ref, mask, rewards.reshape(-1), k, norm)
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(grad).all() and grad.abs().max() == 0.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", NAMES)
def test_junk_off_mask_does_not_leak(name):
    obj = get_objective(cfg_for(name))
    rewards = torch.tensor([[1., 0, 0, 1], [0, 0, 1, 0]])
    lp, old, ref, mask, lengths = random_batch(rewards, seed=4)
    jlp, jold, jref, _, _ = random_batch(rewards, seed=4, junk_off_mask=True)
    norm = obj.normalizer_for(rewards, lengths.tolist())
    loss, grad, _ = loss_and_grad(obj, lp, old, ref, mask, rewards.reshape(-1), 4, norm)
    j_loss, j_grad, _ = loss_and_grad(obj, jlp, jold, jref, mask, rewards.reshape(-1), 4, norm)
    assert j_loss.item() == pytest.approx(loss.item())
    torch.testing.assert_close(j_grad, torch.where(mask, grad, torch.zeros(())))


def sgd_step_changes(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on free per-token logits [N,T,V] at theta = theta_old = theta_ref; returns
    (change of each sequence's log-likelihood, is_positive)."""
    torch.manual_seed(5)
    rewards = torch.tensor([[1., 0, 0, 1], [0, 1, 0, 0]])
    n, t, v, k = 8, 5, 11, 4
    logits = torch.randn(n, t, v, requires_grad=True)
    tokens = torch.randint(0, v, (n, t))
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[1, 3:] = False

    def seq_logprob():
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return token_lp, (token_lp * mask).sum(dim=1)

    obj = get_objective(cfg_for(name, kl_coef=0.0, margin_alpha=0.0))
    token_lp, before = seq_logprob()
    batch = ObjectiveBatch(token_lp, token_lp.detach(), mask, rewards.reshape(-1), k, token_lp.detach())
    loss, _ = obj(batch, obj.normalizer_for(rewards, mask.sum(1).tolist()))
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
        _, after = seq_logprob()
    return after - before.detach(), rewards.reshape(-1) >= 0.5


@pytest.mark.parametrize("name", NAMES)
def test_one_sgd_step_raises_positives_lowers_negatives(name):
    change, is_pos = sgd_step_changes(name)
    assert (change[is_pos] > 0).all(), change
    assert (change[~is_pos] < 0).all(), change


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_adaptive_kl(name):
    obj = get_objective(cfg_for(name, kl_coef=0.1, kl_target=0.01, kl_window=10))
    assert obj.needs_ref
    obj.update_after_step({"objective/kl": 0.05})  # error 4 -> clipped to 0.2: coef * (1 + 0.2 / 10)
    assert obj.kl.coef == pytest.approx(0.102)
    obj.update_after_step({"loss/x": 1.0})  # no KL measured: unchanged
    assert obj.kl.coef == pytest.approx(0.102)
    state = obj.state_dict()
    fresh = get_objective(cfg_for(name, kl_coef=0.1, kl_target=0.01, kl_window=10))
    fresh.load_state_dict(state)
    assert fresh.kl.coef == pytest.approx(0.102)
    other = "grpo" if name != "grpo" else "rence"
    with pytest.raises(ValueError, match="objective.name"):
        get_objective(cfg_for(other, kl_coef=0.1)).load_state_dict(state)


def test_fixed_kl_coef_does_not_adapt():
    obj = get_objective(ObjectiveConfig(name="grpo", kl_coef=0.1))
    obj.update_after_step({"objective/kl": 5.0})
    assert obj.kl.coef == 0.1


@pytest.mark.parametrize("kw, key", [
    (dict(kl_target=0.01), "objective.kl_coef"),
    (dict(kl_coef=0.1, kl_target=-1.0), "objective.kl_target"),
    (dict(kl_coef=-0.1), "objective.kl_coef"),
    (dict(name="rence", overlong_buffer=8), "objective.overlong_buffer"),
    (dict(name="online_dpo", overlong_buffer=8), "objective.overlong_buffer"),
    (dict(name="grpo", clip_eps_low=1.0), "objective.clip_eps_low"),
    (dict(name="rence", margin_alpha=-1.0), "objective.margin_alpha"),
])
def test_bad_options_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        get_objective(ObjectiveConfig(**kw))
