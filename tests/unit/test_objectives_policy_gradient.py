"""GRPO and DAPO: hand-computed advantages, clipped surrogate values and gradients, normalisations, shaping, filters."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives import ObjectiveBatch, get_objective
from megatron_rence.objectives.groups import group_advantages, overlong_penalty


def batch(log_ratios, rewards, lengths=None, ref=None):
    """Per-token log-ratios (logprobs, requires grad; old = 0); `lengths` masks the tail of each row."""
    lp = torch.tensor(log_ratios, dtype=torch.float32).requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool) if lengths is None else \
        torch.arange(lp.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    ref_t = None if ref is None else torch.tensor(ref, dtype=torch.float32)
    return ObjectiveBatch(lp, torch.zeros_like(lp), mask, torch.tensor(rewards, dtype=torch.float32),
                          len(rewards), ref_t)


def pg(name="grpo", **kw):
    return get_objective(ObjectiveConfig(name=name, **kw))


def test_advantages_hand_values():
    # [1, 1, 0, 0]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = 1/sqrt(3) -> A = +-0.5 * sqrt(3)
    a = group_advantages(torch.tensor([[1., 1, 0, 0]]), normalize_std=True)
    torch.testing.assert_close(a, torch.tensor([[1., 1, -1, -1]]) * 0.5 * math.sqrt(3), rtol=1e-5, atol=1e-5)
    a = group_advantages(torch.tensor([[1., 0, 0, 0]]), normalize_std=False)
    torch.testing.assert_close(a, torch.tensor([[0.75, -0.25, -0.25, -0.25]]))
    assert group_advantages(torch.tensor([[1.], [0.]]), normalize_std=True).abs().max() == 0  # K=1
    assert group_advantages(torch.tensor([[1., 1, 1]]), normalize_std=True).abs().max() == 0  # std 0: no NaN


def test_grpo_sequence_level_value_and_gradient():
    # rewards [1, 0], normalize_std off: A = [+0.5, -0.5]; ratio 1 (theta = theta_old).
    # seq 0 has 2 tokens, seq 1 has 1 token (3 columns, masked).
    # loss = (mean_t(-0.5) + mean_t(+0.5)) / 2 sequences = 0;
    # d loss / d lp: seq 0 tokens -A * ratio / len / N = -0.5 / 2 / 2 = -0.125; seq 1 token +0.5 / 1 / 2 = 0.25.
    b = batch([[0., 0, 9], [0, 9, 9]], [1, 0], lengths=[2, 1])
    obj = pg(normalize_std=False)
    assert obj.normalizer_for(b.rewards.reshape(1, 2), [2, 1]) == 2.0
    loss, metrics = obj(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.125, -0.125, 0], [0.25, 0, 0]]))
    assert metrics["objective/clip_frac"] == 0.0


def test_dapo_token_level_value_and_gradient():
    # same batch, token-level: loss = (2 * (-0.5) + 1 * 0.5) / 3 tokens = -1/6; every token's gradient -A / 3.
    b = batch([[0., 0, 9], [0, 9, 9]], [1, 0], lengths=[2, 1])
    obj = pg("dapo", normalize_std=False)
    assert obj.normalizer_for(b.rewards.reshape(1, 2), [2, 1]) == 3.0
    loss, _ = obj(b, 3.0)
    loss.backward()
    assert loss.item() == pytest.approx(-1 / 6, rel=1e-6)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-1 / 6, -1 / 6, 0], [1 / 6, 0, 0]]))


def test_ratio_clipping_values_and_gradients():
    # one token per sequence; rewards [1, 0] -> A = [+0.5, -0.5] (normalize_std off); eps 0.2.
    # seq 0: ratio 1.5, A > 0: min(0.75, 1.2 * 0.5 = 0.6) = 0.6 -> term -0.6, clipped: gradient 0.
    # seq 1: ratio 1.5, A < 0: min(-0.75, -0.6) = -0.75 -> term +0.75, unclipped: gradient -A * ratio = 0.75.
    r = math.log(1.5)
    b = batch([[r], [r]], [1, 0])
    loss, metrics = pg(normalize_std=False)(b, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(-0.6 + 0.75, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[0.0], [0.75]]))
    assert metrics["objective/clip_frac"] == pytest.approx(1.0)  # one clipped sequence / normalizer 1
    # ratio 0.5 with A < 0 is clipped at 0.8 (gradient 0); with A > 0 it is not (gradient -0.5 * 0.5).
    r = math.log(0.5)
    b = batch([[r], [r]], [1, 0])
    loss, _ = pg(normalize_std=False)(b, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(-0.25 + 0.4, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.25], [0.0]]))


def test_clip_higher():
    # ratio 1.25, A = +0.5: GRPO (eps_high = eps_low = 0.2) clips -> gradient 0;
    # DAPO (eps_high 0.28) does not -> gradient -A * ratio = -0.625 (token-level, 1 token, normalizer 1).
    r = math.log(1.25)
    grads = {}
    for name in ("grpo", "dapo"):
        b = batch([[r], [0.0]], [1, 0])
        pg(name, normalize_std=False)(b, 1.0)[0].backward()
        grads[name] = b.logprobs.grad[0, 0].item()
    assert grads["grpo"] == 0.0
    assert grads["dapo"] == pytest.approx(-0.625, rel=1e-6)


def test_presets_and_overrides():
    grpo, dapo = pg("grpo"), pg("dapo")
    assert (grpo.clip_eps_high, grpo.token_level_loss, grpo.dynamic_sampling) == (0.2, False, False)
    assert (dapo.clip_eps_high, dapo.token_level_loss, dapo.dynamic_sampling) == (0.28, True, True)
    custom = pg("grpo", clip_eps_low=0.1, token_level_loss=True, dynamic_sampling=True)
    assert (custom.clip_eps_high, custom.token_level_loss, custom.dynamic_sampling) == (0.1, True, True)
    assert pg("dapo", clip_eps_high=0.3, token_level_loss=False).token_level_loss is False


def test_overlong_penalty_ramp():
    # max_new_tokens 10, buffer 4, penalty 1: 0 up to 6 tokens, then -(L - 6) / 4, -1 at 10 and beyond.
    lengths = torch.tensor([[5, 6, 7, 8, 10, 12]])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 1.0),
                               torch.tensor([[0., 0, -0.25, -0.5, -1, -1]]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 2.0),
                               torch.tensor([[0., 0, -0.5, -1, -2, -2]]))
    assert overlong_penalty(lengths, 10, 0, 1.0).abs().max() == 0


def test_prepare_shapes_rewards_and_dynamic_sampling():
    rewards = torch.tensor([[1., 0], [1, 1], [0, 0], [1, 1]])
    lengths = torch.tensor([[3, 9], [3, 3], [3, 3], [8, 3]])
    dapo = pg("dapo", overlong_buffer=4)
    p = dapo.prepare(rewards, lengths, max_new_tokens=10)
    torch.testing.assert_close(p.rewards, rewards + torch.tensor([[0., -0.75], [0, 0], [0, 0], [-0.5, 0]]))
    # dynamic sampling looks at the verifier's rewards: the all-correct group with an overlong member is dropped.
    assert p.keep.tolist() == [True, False, False, False]
    assert p.metrics["groups/zero_variance_frac"] == pytest.approx(0.75)
    assert dapo.normalizer(p) == 12.0  # tokens of the kept group
    grpo = pg("grpo")
    p = grpo.prepare(rewards, lengths, max_new_tokens=10)
    assert p.keep.all() and grpo.normalizer(p) == 8.0  # sequences
    torch.testing.assert_close(p.rewards, rewards)


def test_kl_penalty_value():
    # A = 0 (equal rewards), ratio 1; ref = ln2 on 2 tokens of seq 0: k3 = 1 - ln2 per token, 0 on seq 1.
    # sequence-level: loss = coef * (mean_t k3 of seq 0 + 0) / 2 = 0.1 * (1 - ln2) / 2.
    b = batch([[0., 0], [0, 0]], [1, 1], ref=[[math.log(2)] * 2, [0., 0]])
    loss, metrics = pg(kl_coef=0.1)(b, 2.0)
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2)) / 2, rel=1e-6)
    assert metrics["objective/kl"] == pytest.approx((1 - math.log(2)) / 2, rel=1e-6)
    loss.backward()  # d k3 / d lp = 1 - exp(ref - lp) = -1 -> 0.1 * (-1) / 2 tokens / 2 sequences
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.025, -0.025], [0, 0]]))


def test_truncated_importance_sampling_weights_by_hand():
    # GRPO, rewards [1, 0], normalize_std off: A = [+0.5, -0.5], ratio 1, 2 tokens per sequence.
    # rollout log-probs vs old (0): token weights min(exp(0 - r), C) with C = 2:
    #   seq 0: r = [-ln 1.5, -ln 4] -> w = [1.5, 2 (capped)];   seq 1: r = [0, ln 2] -> w = [1, 0.5]
    # per-token terms -A * w: seq 0 [-0.75, -1.0], seq 1 [0.5, 0.25]; sequence means -0.875 and 0.375;
    # loss = (-0.875 + 0.375) / 2 sequences = -0.25; gradient -A * ratio * w / len / N.
    lp = torch.zeros(2, 2, requires_grad=True)
    rollout = torch.tensor([[-math.log(1.5), -math.log(4.0)], [0.0, math.log(2.0)]])
    b = ObjectiveBatch(lp, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), 2,
                       rollout_logprobs=rollout)
    obj = pg(normalize_std=False, tis_cap=2.0)
    assert obj.needs_rollout_logprobs and not pg().needs_rollout_logprobs
    loss, metrics = obj(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-0.25, rel=1e-6)
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.1875, -0.25], [0.125, 0.0625]]))
    assert metrics["objective/tis_weight_mean"] == pytest.approx((1.75 + 0.75) / 2)  # sequence means / N
    assert metrics["objective/tis_clip_frac"] == pytest.approx((0.5 + 0.0) / 2)
    # the engine sampled from the trainer's policy: every weight is 1 and the loss is plain GRPO
    same = ObjectiveBatch(torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool),
                          torch.tensor([1.0, 0.0]), 2, rollout_logprobs=torch.zeros(2, 2))
    plain = ObjectiveBatch(torch.zeros(2, 2, requires_grad=True), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool),
                           torch.tensor([1.0, 0.0]), 2)
    assert obj(same, 2.0)[0].item() == pg(normalize_std=False)(plain, 2.0)[0].item()
    with pytest.raises(ValueError, match="objective.tis_cap: the batch has no rollout_logprobs"):
        obj(plain, 2.0)
    with pytest.raises(ValueError, match="objective.tis_cap must be > 0"):
        pg(tis_cap=0.0)


def test_tis_ignores_junk_off_the_mask():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rollout = torch.tensor([[-0.2, 0.1, float("nan")], [0.3, float("inf"), float("-inf")]])
    clean = torch.where(mask, rollout, torch.zeros(()))
    results = []
    for r in (rollout, clean):
        lp = torch.zeros(2, 3, requires_grad=True)
        b = ObjectiveBatch(lp, torch.zeros(2, 3), mask, torch.tensor([1.0, 0.0]), 2, rollout_logprobs=r)
        loss, metrics = pg("dapo", tis_cap=1.1)(b, 3.0)
        loss.backward()
        results.append((loss.item(), lp.grad.clone(), metrics["objective/tis_weight_mean"]))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2] and math.isfinite(results[0][0])


def test_dual_clip_caps_negative_advantages_by_hand():
    # one token per sequence; rewards [1, 0] -> A = [+0.5, -0.5] (normalize_std off); eps 0.2; c = 3.
    # A < 0, ratio 4: PPO term max(-A * 4, -A * clip(4) = -A * 1.2) = 2.0; dual clip min(2.0, 3 * 0.5 = 1.5) = 1.5,
    #   a constant: gradient 0 (without the dual clip it is -A * ratio = 2.0).
    # A > 0, ratio 4: clipped at 1.2 as before: term -0.6, gradient 0 (the dual clip never touches A > 0).
    r = math.log(4.0)
    b = batch([[r], [r]], [1, 0])
    loss, metrics = pg(normalize_std=False, dual_clip_c=3.0)(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx((-0.6 + 1.5) / 2, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[0.0], [0.0]]))
    assert metrics["objective/dual_clip_frac"] == pytest.approx(0.5)  # one of two sequences
    b = batch([[r], [r]], [1, 0])
    loss, metrics = pg(normalize_std=False)(b, 2.0)  # off (the default): the A < 0 token keeps its gradient
    loss.backward()
    assert loss.item() == pytest.approx((-0.6 + 2.0) / 2, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[0.0], [1.0]]))  # -A * ratio / normalizer 2
    assert "objective/dual_clip_frac" not in metrics
    # below the cap (ratio 2 < 3) the dual clip changes nothing: term -A * 2 = 1.0, gradient 1.0 (DAPO, token level)
    r = math.log(2.0)
    for c in (None, 3.0):
        b = batch([[0.0], [r]], [1, 0])
        loss, _ = pg("dapo", normalize_std=False, dual_clip_c=c)(b, 1.0)
        loss.backward()
        assert loss.item() == pytest.approx(-0.5 + 1.0, rel=1e-5)
        torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.5], [1.0]]))


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="objective.dual_clip_c"):
        pg(dual_clip_c=1.0)


def test_extreme_log_ratio_is_clamped_with_zero_gradient():
    # verl's clamp: log-ratio in [-20, 20] before the exp. Without it, a log-ratio of 100 nats overflows float32
    # (exp(100) = inf): the GRPO loss is inf. A = [+0.5, -0.5] (normalize_std off), one token each.
    # A < 0, log-ratio 100 -> clamped to 20: term -A * e^20 (the unclipped branch wins for A < 0), a constant,
    # so its gradient is 0; A > 0, log-ratio 0: term -0.5, gradient -A / 2 = -0.25.
    b = batch([[0.0], [100.0]], [1, 0])
    loss, _ = pg(normalize_std=False)(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 + 0.5 * math.exp(20.0)) / 2, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.25], [0.0]]))
    # with the dual clip: the loss is capped at c * |A| = 1.5 and the gradient is finite (zero), not NaN
    b = batch([[0.0], [100.0]], [1, 0])
    loss, _ = pg(normalize_std=False, dual_clip_c=3.0)(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx((-0.5 + 1.5) / 2, rel=1e-5)
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-0.25], [0.0]]))
    # a very negative log-ratio (-100 -> -20): for A > 0 the unclipped branch wins, term -A * e^-20, a constant
    # after the clamp: gradient exactly 0 (unclamped it was -A * e^-100 / 2, a float32 denormal)
    b = batch([[-100.0], [0.0]], [1, 0])
    loss, _ = pg(normalize_std=False)(b, 2.0)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(b.logprobs.grad).all() and b.logprobs.grad[0, 0] == 0.0


def test_k3_clamps_like_verl_and_stays_finite():
    from megatron_rence.objectives.kl import K3_CLAMP, LOG_RATIO_CLAMP, k3_per_token
    assert (LOG_RATIO_CLAMP, K3_CLAMP) == (20.0, 10.0)
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    ref = torch.tensor([math.log(2.0), 2.0, 100.0, -30.0])
    k3 = k3_per_token(lp, ref)
    k3.sum().backward()
    # d = ln2: 1 - ln2, gradient 1 - e^d = -1; d = 2: e^2 - 3 = 4.389 < 10, gradient 1 - e^2;
    # d = 100 and d = -30: k3 clamped at 10 (exp(100) would be inf): constant, gradient 0
    torch.testing.assert_close(k3, torch.tensor([1 - math.log(2.0), math.exp(2.0) - 3.0, 10.0, 10.0]))
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0, 1 - math.exp(2.0), 0.0, 0.0]))


def test_grpo_kl_term_finite_when_reference_far_above_policy():
    # ref - lp = 100 nats: the unclamped k3 is inf (exp(100) overflows float32) and the step would be skipped
    b = batch([[0.0], [0.0]], [1, 1], ref=[[100.0], [0.0]])
    loss, metrics = pg(kl_coef=0.1)(b, 2.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.1 * 10.0 / 2, rel=1e-6)
    assert metrics["objective/kl"] == pytest.approx(5.0)
    assert torch.isfinite(b.logprobs.grad).all()
