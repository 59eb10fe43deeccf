"""ReNCE: hand-computed losses and gradients, the margin, positives never competing, group filters, KL."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_rence.config import ObjectiveConfig
from megatron_rence.objectives import ObjectiveBatch, get_objective
from megatron_rence.objectives.rence import ReNCE

LN2, LN3, LN5 = math.log(2), math.log(3), math.log(5)


def batch(log_ratios, rewards, k=None, ref=None, lengths=None):
    """One token per sequence unless `lengths`: logprobs = log_ratios (requires grad), old = 0."""
    lp = torch.tensor(log_ratios, dtype=torch.float32)
    if lp.dim() == 1:
        lp = lp.unsqueeze(1)
    lp.requires_grad_(True)
    mask = torch.ones_like(lp, dtype=torch.bool) if lengths is None else \
        torch.arange(lp.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    r = torch.tensor(rewards, dtype=torch.float32)
    ref_t = None if ref is None else torch.tensor(ref, dtype=torch.float32).reshape(lp.shape)
    return ObjectiveBatch(lp, torch.zeros_like(lp), mask, r, k or len(rewards), ref_t)


def rence(**kw) -> ReNCE:
    return get_objective(ObjectiveConfig(name="rence", **kw))


def test_single_positive_value():
    # s = [ln2, 0, ln3], P = {0}: -log(2 / (2 + 1 + 3)) = ln 3
    b = batch([LN2, 0.0, LN3], [1, 0, 0])
    loss, metrics = rence()(b, 1.0)
    assert loss.item() == pytest.approx(LN3, rel=1e-6)
    assert metrics["loss/rence"] == pytest.approx(LN3, rel=1e-6)
    assert metrics["objective/pos_prob"] == pytest.approx(1 / 3, rel=1e-6)
    assert metrics["objective/num_positives"] == 1 and metrics["objective/num_negatives"] == 2


def test_beta_scales_the_score():
    # beta = 2, log-ratios [ln2/2, 0, ln3/2] give the same scores as above: ln 3
    b = batch([LN2 / 2, 0.0, LN3 / 2], [1, 0, 0])
    assert rence(beta=2.0)(b, 1.0)[0].item() == pytest.approx(LN3, rel=1e-6)


def test_two_positives_sum_and_mean_and_no_competition():
    # s = [0, ln3, 0, 0], P = {0, 1}, N = {2, 3}: LSE_N = ln 2
    # term_0 = -log(1 / (1 + 2)) = ln 3;  term_1 = -log(3 / (3 + 2)) = ln(5/3);  sum = ln 5, mean = ln5 / 2.
    # (if positives competed, term_0 would be -log(1 / (1 + 3 + 2)) = ln 6.)
    rewards = [1, 1, 0, 0]
    assert rence(reduce_positives="sum")(batch([0.0, LN3, 0, 0], rewards), 1.0)[0].item() == pytest.approx(LN5, rel=1e-6)
    assert rence(reduce_positives="mean")(batch([0.0, LN3, 0, 0], rewards), 1.0)[0].item() == pytest.approx(LN5 / 2, rel=1e-6)


def test_positives_never_compete():
    # Raising positive 1's score changes only its own term: positive 0's gradient is unchanged.
    obj = rence(reduce_positives="sum")
    grads = []
    for s1 in (0.0, 4.0):
        b = batch([0.3, s1, -0.2, 0.5, 0.1], [1, 1, 0, 0, 0])
        obj(b, 1.0)[0].backward()
        grads.append(b.logprobs.grad[:, 0].clone())
    assert grads[0][0].item() == pytest.approx(grads[1][0].item(), rel=1e-6)
    assert grads[0][1].item() != pytest.approx(grads[1][1].item())


@pytest.mark.parametrize("reduce, div", [("sum", 1.0), ("mean", 2.0)])
def test_gradient_at_theta_old(reduce, div):
    # theta = theta_old, no margin: s = 0. |P| = 2, |N| = 3, beta = 0.5, three tokens per sequence.
    # d L / d s_p = -|N| / (1 + |N|) = -3/4  -> per token -beta * 3/4 = -0.375 (sum form), / |P| for mean;
    # d L / d s_n = +|P| / (1 + |N|) = 2/4   -> per token +beta * 2/4 = +0.25  (sum form), / |P| for mean.
    b = batch(torch.zeros(5, 3).tolist(), [1, 0, 1, 0, 0])
    loss, _ = rence(beta=0.5, reduce_positives=reduce)(b, 1.0)
    loss.backward()
    expected = torch.tensor([-0.375, 0.25, -0.375, 0.25, 0.25]).unsqueeze(1).expand(5, 3) / div
    torch.testing.assert_close(b.logprobs.grad, expected)
    assert loss.item() == pytest.approx(2 * math.log(4) / div, rel=1e-6)  # each term ln(1 + |N|)


def test_normalizer_divides():
    b = batch([LN2, 0.0, LN3], [1, 0, 0])
    assert rence()(b, 4.0)[0].item() == pytest.approx(LN3 / 4, rel=1e-6)


def test_margin_value():
    # margin_alpha = ln2, rewards [1, 0, 0]: m_p = ln2 * (1 - 0) = ln2; s = [ln2, 0, ln3]
    # -log(exp(ln2 - ln2) / (1 + 1 + 3)) = ln 5
    b = batch([LN2, 0.0, LN3], [1, 0, 0])
    assert rence(margin_alpha=LN2)(b, 1.0)[0].item() == pytest.approx(LN5, rel=1e-6)


def test_margin_scales_with_reward_gap_and_ignores_reward_offset():
    # graded rewards [1.0, 0.4, 0.0], threshold 0.5: negatives' mean reward 0.2, m_p = alpha * 0.8.
    # alpha = ln2 / 0.8 -> m_p = ln2 -> the same ln 5 as with binary rewards.
    s = [LN2, 0.0, LN3]
    obj = rence(margin_alpha=LN2 / 0.8)
    assert obj(batch(s, [1.0, 0.4, 0.0]), 1.0)[0].item() == pytest.approx(LN5, rel=1e-6)
    shifted = rence(margin_alpha=LN2 / 0.8, positive_threshold=10.5)
    assert shifted(batch(s, [11.0, 10.4, 10.0]), 1.0)[0].item() == pytest.approx(LN5, rel=1e-6)


def test_length_normalize():
    # lengths 2 and 1; log-ratio per token ln2 on the positive (sum 2 ln2, mean ln2), 0 on the negative.
    # length_normalize: s = [ln2, 0] -> -log(2/3) = ln(3/2); otherwise s = [2 ln2, 0] -> -log(4/5) = ln(5/4).
    b = lambda: batch([[LN2, LN2], [0.0, 7.0]], [1, 0], lengths=[2, 1])  # noqa: E731 (7.0 lies off the mask)
    assert rence(length_normalize=True)(b(), 1.0)[0].item() == pytest.approx(math.log(1.5), rel=1e-6)
    assert rence(length_normalize=False)(b(), 1.0)[0].item() == pytest.approx(math.log(1.25), rel=1e-6)


@pytest.mark.parametrize("rewards", [[1, 1, 1], [0, 0, 0]])
def test_no_negatives_or_no_positives_gives_zero_gradient(rewards):
    b = batch([0.5, -1.0, 2.0], rewards)
    loss, metrics = rence(kl_coef=0.0)(b, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and b.logprobs.grad.abs().max().item() == 0.0
    assert metrics["objective/num_groups"] == 0


def test_unusable_group_beside_usable_group():
    # group 0 usable (ln 3 as above), group 1 all negative: contributes nothing, normalizer counts 1 group.
    b = batch([LN2, 0.0, LN3, 5.0, -3.0, 1.0], [1, 0, 0, 0, 0, 0], k=3)
    obj = rence()
    norm = obj.normalizer_for(b.rewards.reshape(2, 3), [1] * 6)
    assert norm == 1.0
    loss, _ = obj(b, norm)
    loss.backward()
    assert loss.item() == pytest.approx(LN3, rel=1e-6)
    assert b.logprobs.grad[3:].abs().max().item() == 0.0


def test_prepare_filters_and_t_easy():
    rewards = torch.tensor([[1., 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    lengths = torch.full((5, 4), 3)
    # positive fractions 0.25, 0.75, 1, 0, 0.5; t_easy = 0.5 drops the 0.75 group (> 0.5), keeps 0.5.
    p = rence(t_easy=0.5).prepare(rewards, lengths, 8)
    assert p.keep.tolist() == [True, False, False, False, True]
    assert p.metrics["groups/dropped_easy_frac"] == pytest.approx(0.2)
    assert p.metrics["groups/kept_frac"] == pytest.approx(0.4)
    assert rence(t_easy=0.5).normalizer(p) == 2.0
    p = rence(t_easy=0.75).prepare(rewards, lengths, 8)
    assert p.keep.tolist() == [True, True, False, False, True]
    torch.testing.assert_close(p.rewards, rewards)  # ReNCE does not shape rewards


def test_kl_penalty_value():
    # one usable group of two sequences (2 tokens each). lp = 0 everywhere, ref = ln2 on every token of
    # sequence 0 and 0 on sequence 1: k3 = exp(ln2) - ln2 - 1 = 1 - ln2 on seq 0 tokens, 0 on seq 1.
    # group KL = mean over sequences of token means = (1 - ln2) / 2; loss = NCE(0, 0) + 0.1 * KL = ln2 + 0.05 (1 - ln2)
    b = batch([[0.0, 0.0], [0.0, 0.0]], [1, 0], ref=[[LN2, LN2], [0.0, 0.0]])
    loss, metrics = rence(kl_coef=0.1)(b, 1.0)
    assert metrics["objective/kl"] == pytest.approx((1 - LN2) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(LN2 + 0.05 * (1 - LN2), rel=1e-6)
    # d k3 / d lp = 1 - exp(ref - lp) = 1 - 2 = -1 per token: the KL pulls seq 0 towards the reference.
    loss.backward()
    nce_grad_pos = -0.5  # -|N| / (1 + |N|) with |N| = 1
    expected_seq0 = nce_grad_pos + 0.1 * 0.5 * 0.5 * (-1.0)  # coef * (1/K sequences) * (1/2 tokens) * dk3
    torch.testing.assert_close(b.logprobs.grad[0], torch.full((2,), expected_seq0))


def test_kl_needs_ref_logprobs():
    with pytest.raises(ValueError, match="ref_logprobs"):
        rence(kl_coef=0.1)(batch([0.0, 0.0], [1, 0]), 1.0)


def test_large_scores_are_stable():
    b = batch([300.0, -200.0, 250.0], [1, 0, 0])
    loss, _ = rence()(b, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log1p(math.exp(-50.0)), abs=1e-12)
    assert torch.isfinite(b.logprobs.grad).all()


def test_constant_margin_reweights_groups_at_theta_old():
    # 0/1 rewards: m = alpha for every positive. At s = 0 a positive's gradient is -w / normalizer with
    # w = sigmoid(log|N| + m) = |N| e^m / (1 + |N| e^m) (docs/design.md). Two groups of K=4 (one positive each):
    # |N| = 3 and, with a second positive, |N| = 2 (mean over positives halves each positive's share).
    rewards = [1, 0, 0, 0, 1, 1, 0, 0]
    e = math.e
    for alpha, w3, w2 in [(0.0, 3 / 4, 2 / 3), (1.0, 3 * e / (1 + 3 * e), 2 * e / (1 + 2 * e))]:
        b = batch([0.0] * 8, rewards, k=4)
        rence(margin_alpha=alpha)(b, 2.0)[0].backward()
        g = b.logprobs.grad[:, 0]
        torch.testing.assert_close(g[[0, 4, 5]], torch.tensor([-w3, -w2 / 2, -w2 / 2]) / 2)
        torch.testing.assert_close(g[[1, 6]], torch.tensor([w3 / 3, w2 / 2]) / 2)  # negatives: w / |N| each
    # the ratio of the two groups' weights moves from (3/4)/(2/3) = 1.125 to about 1.055: not a global scale,
    # so Adam does not undo it (a margin with 0/1 rewards is constant, yet not without effect)
    assert (3 / 4) / (2 / 3) != pytest.approx((3 * e / (1 + 3 * e)) / (2 * e / (1 + 2 * e)), rel=1e-2)


def test_kl_term_finite_when_reference_far_above_policy():
    # ref - lp = 100 nats on seq 0's tokens: unclamped k3 = exp(100) - 101 = inf in float32 (a skipped step).
    # Clamped as verl does: k3 = 10 per token, a constant (zero gradient); group KL = (10 + 0) / 2 = 5.
    b = batch([[0.0, 0.0], [0.0, 0.0]], [1, 0], ref=[[100.0, 100.0], [0.0, 0.0]])
    loss, metrics = rence(kl_coef=0.1)(b, 1.0)
    loss.backward()
    assert metrics["objective/kl"] == pytest.approx(5.0)
    assert loss.item() == pytest.approx(LN2 + 0.1 * 5.0, rel=1e-6)
    torch.testing.assert_close(b.logprobs.grad[0], torch.full((2,), -0.5))  # the NCE part only


def test_score_against_current_is_the_first_step_of_a_rollout_at_any_theta():
    # log-ratios [ln2, 0, ln3] (theta moved away from theta_old). score_against=current: every score is 0, so the
    # loss is -log(1 / (1 + 2)) = ln 3 and the gradient is the theta = theta_old one, beta * (-|N|/(1+|N|)) = -2/3
    # for the positive and beta * (1/(1+|N|)) = 1/3 for each negative (one positive, |N| = 2; beta = 2 here)
    b = batch([LN2, 0.0, LN3], [1, 0, 0])
    loss, metrics = rence(score_against="current", beta=2.0)(b, 1.0)
    loss.backward()
    assert loss.item() == pytest.approx(LN3, rel=1e-6)
    assert metrics["objective/score_gap"] == 0.0
    torch.testing.assert_close(b.logprobs.grad, torch.tensor([[-4 / 3], [2 / 3], [2 / 3]]))
    b_old = batch([0.0, 0.0, 0.0], [1, 0, 0])  # the default at theta = theta_old gives the same loss and gradient
    loss_old, _ = rence(beta=2.0)(b_old, 1.0)
    loss_old.backward()
    torch.testing.assert_close(b.logprobs.grad, b_old.logprobs.grad)
