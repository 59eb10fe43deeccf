"""Per-token / per-sequence log-probs (TP=1 path) against naive full-vocabulary log_softmax and hand values."""
import math

import pytest
import torch

from megatron_rence.megatron import logprobs as lp
from megatron_rence.megatron import packing


def _naive(logits, targets, temperature=1.0, vocab_size=None):
    x = logits.float() / temperature
    if vocab_size is not None:
        x = x[..., :vocab_size]
    return torch.log_softmax(x, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive_log_softmax_and_its_gradient(chunk_size, temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g, dtype=torch.float64)
    a = logits.clone().requires_grad_()
    out = lp.vocab_parallel_logprobs(a, targets, None, temperature, chunk_size)
    (out * weights).sum().backward()
    b = logits.clone().requires_grad_()
    ref = _naive(b, targets, temperature).double()
    (ref * weights).sum().backward()
    assert out.dtype == torch.float32 and out.shape == (3, 7)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_double():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 9, (6,), generator=g)

    def fn(x):  # the Function computes in fp32; gradcheck compares against finite differences loosely
        return lp.vocab_parallel_logprobs(x, targets, None, 0.5, 4).double()

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_hand_value_uniform_logits():
    logits = torch.zeros(1, 4, 8)
    targets = torch.tensor([[1, 2, 3, packing.IGNORE]])
    out = lp.vocab_parallel_logprobs(logits, targets)
    expected = torch.tensor([[math.log(1 / 8)] * 3 + [0.0]])
    torch.testing.assert_close(out, expected)


def test_padded_vocabulary_is_excluded():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 40, generator=g)
    logits[:, 32:] = 50.0  # megatron's padding rows must not take probability mass
    targets = torch.randint(0, 32, (10,), generator=g)
    out = lp.vocab_parallel_logprobs(logits, targets, vocab_size=32)
    torch.testing.assert_close(out, _naive(logits, targets, vocab_size=32))


def test_bf16_logits_computed_in_fp32():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(16, 300, generator=g) * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 300, (16,), generator=g)
    out = lp.vocab_parallel_logprobs(logits, targets, chunk_size=3)
    torch.testing.assert_close(out, _naive(logits.detach(), targets), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_ignored_targets_get_zero_and_no_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.tensor([[1, 2, -1, -1, 4], [-1, 0, 0, 0, 0]])
    out = lp.vocab_parallel_logprobs(logits, targets, chunk_size=3)
    assert out[0, 2] == 0 and out[1, 0] == 0
    out.sum().backward()
    assert torch.all(logits.grad[0, 2] == 0) and torch.all(logits.grad[1, 0] == 0)
    assert torch.any(logits.grad[0, 1] != 0)


def test_entropy_matches_naive():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 6, 30, generator=g)
    logits[..., 25:] = 9.0
    h = lp.vocab_parallel_entropy(logits, temperature=0.8, chunk_size=5, vocab_size=25)
    p = torch.softmax(logits[..., :25] / 0.8, dim=-1)
    torch.testing.assert_close(h, -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-5)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        lp.vocab_parallel_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):
        lp.vocab_parallel_logprobs(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_sequence_logprobs_masked_sum_and_mean():
    tok = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    torch.testing.assert_close(lp.sequence_logprobs(tok, mask), torch.tensor([-5.0, -1.0]))
    torch.testing.assert_close(lp.sequence_logprobs(tok, mask, length_normalize=True), torch.tensor([-2.5, -0.5]))
    # packed layout: same values laid out in one row with a sequence index
    flat, seq_index = tok.reshape(1, -1), torch.tensor([0, 0, 0, 0, 1, 1, -1, -1])
    out = lp.sequence_logprobs(flat, mask.reshape(1, -1), seq_index=seq_index, num_sequences=2)
    torch.testing.assert_close(out, torch.tensor([-5.0, -1.0]))
    # a sequence with an empty response is 0 (sum) and 0 (mean), never NaN
    empty = lp.sequence_logprobs(tok[:1], torch.zeros(1, 4), length_normalize=True)
    assert empty.item() == 0.0


def test_prompt_tokens_never_count():
    """Changing logits at positions that predict prompt tokens leaves the sequence log-likelihood unchanged."""
    batch = packing.pad_batch([([5, 6, 7, 8, 9], 3), ([1, 2, 3], 1)], pad_id=0)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 12, generator=g)
    base = lp.sequence_logprobs(lp.logprobs_from_logits(logits, batch), batch.loss_mask)
    changed = logits.clone()
    changed[0, :2] += 100 * torch.randn(2, 12, generator=g)  # positions 0,1 predict prompt tokens 6,7
    changed[:, 4] += 100.0  # last position has no next token; row 1 positions >= 2 are padding
    changed[1, 2:] -= 50.0
    torch.testing.assert_close(lp.sequence_logprobs(lp.logprobs_from_logits(changed, batch), batch.loss_mask), base)
    # and the value is the sum of the response tokens' log-probs: row 0 responses 8,9 at positions 2,3
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(base[0], full[0, 2, 8] + full[0, 3, 9])
    torch.testing.assert_close(base[1], full[1, 0, 2] + full[1, 1, 3])
