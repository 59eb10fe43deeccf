"""LocalCoreAttention equals megatron's DotProductAttention on padded batches (GQA, softmax scale), its packed THD
path equals attention over each sequence alone, and a GPTModel fed a packed batch gives the padded batch's
per-token log-probs and gradients (single process; TP / PP / CP are in tests/distributed/test_packing_parallel.py).
"""
import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.megatron import logprobs, packing
from megatron_rence.megatron.attention import LocalCoreAttention
from megatron_rence.megatron.model import build_model, transformer_config
from tests.megatron_state import single_rank

MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                    max_position_embeddings=64, make_vocab_size_divisible_by=8, dtype="fp32")
VOCAB = 41


@pytest.fixture(scope="module")
def single_process():
    with single_rank(seed=5) as state:
        yield state


def _qkv(s, b, g):
    q = torch.randn(s, b, 4, 8, generator=g)
    return q, torch.randn(s, b, 2, 8, generator=g), torch.randn(s, b, 2, 8, generator=g)


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_padded_matches_megatron_dot_product_attention(single_process, softmax_scale):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    config = transformer_config(MODEL, ParallelConfig(), use_cuda=False)
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                softmax_scale=softmax_scale)
    q, k, v = _qkv(7, 3, torch.Generator().manual_seed(0))
    want = DotProductAttention(**args)(q, k, v, None)
    got = LocalCoreAttention(**args)(q, k, v, None)
    assert got.shape == want.shape == (7, 3, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_packed_is_block_diagonal_causal(single_process):
    """Lengths 5 and 8 share a length class (one padded batch), 1 is alone."""
    config = transformer_config(MODEL, ParallelConfig(), use_cuda=False)
    attn = LocalCoreAttention(config, 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(1)
    lengths = [5, 1, 8]
    q, k, v = (x[:, 0] for x in _qkv(sum(lengths), 1, g))
    cu = torch.tensor([0, 5, 6, 14], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                             cu_seqlens_kv_padded=cu, max_seqlen_q=8, max_seqlen_kv=8)
    got = attn(q, k, v, None, packed_seq_params=params)
    for s, e in zip(cu.tolist(), cu.tolist()[1:]):
        alone = attn(q[s:e, None], k[s:e, None], v[s:e, None], None)[:, 0]
        torch.testing.assert_close(got[s:e], alone, atol=1e-6, rtol=1e-5)
    # a token of the third sequence is unaffected by changing the first sequence's keys
    k2 = k.clone()
    k2[:5] += 10.0
    torch.testing.assert_close(attn(q, k2, v, None, packed_seq_params=params)[6:], got[6:])


def test_rejects_what_it_does_not_implement(single_process):
    config = transformer_config(MODEL, ParallelConfig(), use_cuda=False)
    with pytest.raises(ValueError, match="causal"):
        LocalCoreAttention(config, 1, AttnMaskType.padding, "self")
    with pytest.raises(ValueError, match="dropout"):
        LocalCoreAttention(config, 1, AttnMaskType.causal, "self", attention_dropout=0.1)
    attn = LocalCoreAttention(config, 1, AttnMaskType.causal, "self")
    q, k, v = _qkv(4, 1, torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="attention_mask"):
        attn(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_gpt_model_packed_equals_padded_logprobs_and_grads(single_process):
    """Whole model: a packed [1, T] batch (sequences padded to a multiple of 4) gives the padded batch's
    per-token log-probs and parameter gradients."""
    model = build_model(MODEL, ParallelConfig(), VOCAB)[0]
    g = torch.Generator().manual_seed(3)
    seqs = [(torch.randint(1, VOCAB, (n,), generator=g).tolist(), p) for n, p in ((9, 3), (4, 2), (13, 5), (2, 1))]
    padded = packing.pad_batch(seqs, 0)
    lp = logprobs.logprobs_from_logits(model(padded.tokens, padded.position_ids, None), padded, None, 0.8, VOCAB)
    want = padded.response_logprobs(lp)
    lp.sum().backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed = packing.pack_thd(seqs, 0, multiple=4)
    cu, cu_pad = packed.cu_seqlens, packed.cu_seqlens_padded
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                             cu_seqlens_kv_padded=cu_pad, max_seqlen_q=packed.max_seqlen,
                             max_seqlen_kv=packed.max_seqlen)
    out = model(packed.tokens, packed.position_ids, None, packed_seq_params=params)
    lp = logprobs.logprobs_from_logits(out, packed, None, 0.8, VOCAB)
    got = packing.unpack_response_logprobs(packed, lp)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    lp.sum().backward()
    for p, w in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-5)
