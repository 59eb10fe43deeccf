"""Block FP8 rollout weights: hand-computed scales, the e4m3 error bound, which tensors are quantised, the
W8A8 activation emulation, and the CPU engine loading a quantised bucket as the FP8-rounded weights."""
import pytest
import torch
import transformers

from megatron_rence.rollout.hf_engine import HFEngine
from megatron_rence.weights.quantize import (FP8, FP8_MAX, dequantize_block_fp8, dequantize_bucket, emulate_w8a8,
                                             fake_quantize_activations, quantize_block_fp8, quantize_bucket)


def test_scale_is_block_amax_over_448_and_exact_values_survive():
    w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 4.0, 0.0], [3.0, 0.0, 0.0]])
    q, scale_inv = quantize_block_fp8(w, block=2)
    # blocks: [[1,-2],[.5,4]] amax 4 | [[0],[0]] all zero | [[3, 0]] amax 3 | [[0]]
    assert torch.equal(scale_inv, torch.tensor([[4 / 448, 1.0], [3 / 448, 1.0]]))
    assert q.dtype == FP8 and q.shape == w.shape
    assert q.float()[:2, :2].tolist() == [[112.0, -224.0], [56.0, 448.0]]  # w * 448 / 4, all exact in e4m3
    torch.testing.assert_close(dequantize_block_fp8(q, scale_inv, block=2), w, rtol=1e-6, atol=0)


def test_error_bound_of_e4m3():
    torch.manual_seed(0)
    w = torch.randn(300, 260) * 0.02
    w[5, 7] = 0.5  # one outlier: only its block gets a coarse scale
    q, scale_inv = quantize_block_fp8(w)
    assert scale_inv.shape == (3, 3) and q.float().abs().max() <= FP8_MAX
    back = dequantize_block_fp8(q, scale_inv)
    scale = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    # e4m3: 3 mantissa bits (relative half-spacing 2^-4), subnormal spacing 2^-9 (times the block scale)
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12).all()
    assert (back - w)[128:, 128:].abs().max() < (back - w)[:128, :128].abs().max()  # the outlier's block
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.zeros(4))



def test_chunked_quantisation_equals_one_pass():
    """Row-block chunks bound the fp32 temporaries; the values and scales are the same as in one pass."""
    torch.manual_seed(1)
    w = (torch.randn(300, 260) * 0.05).bfloat16()
    w[200, 3] = 2.0  # an outlier in the second row block
    whole = quantize_block_fp8(w, chunk_bytes=1 << 30)
    for chunk_bytes in (1, 3 * 128 * 128 * 4):  # one row block per step, exactly one block row of fp32
        q, scale_inv = quantize_block_fp8(w, chunk_bytes=chunk_bytes)
        assert torch.equal(q.view(torch.uint8), whole[0].view(torch.uint8)) and torch.equal(scale_inv, whole[1])
    assert whole[1][1, 0] == 2.0 / 448 and whole[1].shape == (3, 3)

def test_bucket_quantises_only_linear_weights_and_round_trips():
    bucket = [("model.embed_tokens.weight", torch.randn(10, 8)),
              ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8)),
              ("model.layers.0.self_attn.q_proj.bias", torch.randn(8)),
              ("model.layers.0.mlp.down_proj.weight", torch.randn(8, 16)),
              ("model.layers.0.input_layernorm.weight", torch.randn(8)),
              ("lm_head.weight", torch.randn(10, 8))]
    out = dict(quantize_bucket(bucket))
    assert set(out) == {n for n, _ in bucket} | {"model.layers.0.self_attn.q_proj.weight_scale_inv",
                                                 "model.layers.0.mlp.down_proj.weight_scale_inv"}
    assert [n for n, t in out.items() if t.dtype == FP8] == ["model.layers.0.self_attn.q_proj.weight",
                                                            "model.layers.0.mlp.down_proj.weight"]
    back = dict(dequantize_bucket(list(out.items()), torch.float32))
    assert set(back) == {n for n, _ in bucket}
    for name, tensor in bucket:
        if back[name].dtype == tensor.dtype and "proj.weight" not in name:
            assert torch.equal(back[name], tensor), name
        else:
            torch.testing.assert_close(back[name], tensor, rtol=0.07, atol=1e-3)


def test_cpu_engine_loads_a_quantised_bucket_as_rounded_weights():
    from megatron_rence.data.tokenizer import build_synthetic_tokenizer

    tokenizer = build_synthetic_tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    engine = HFEngine(config, tokenizer, device="cpu")
    torch.manual_seed(1)
    w = torch.randn(64, 32) * 0.02
    engine.update_weights(quantize_bucket([("model.layers.0.mlp.up_proj.weight", w)]), version=3)
    q, s = quantize_block_fp8(w)
    assert torch.equal(engine.named_weight("model.layers.0.mlp.up_proj.weight"), dequantize_block_fp8(q, s))
    assert engine.weight_version == 3
    assert len(engine.w8a8_hooks) == 7  # q, k, v, o, gate, up, down of the one layer: activations rounded too
    engine.update_weights(quantize_bucket([("model.layers.0.mlp.up_proj.weight", w)]), version=4)
    assert len(engine.w8a8_hooks) == 7  # installed once


def test_activation_groups_by_hand():
    # group 2: [1, -4] amax 4 -> scale 4/448: 1 -> 112, -4 -> -448 (exact); [3, 0] -> 448, 0 (exact)
    x = torch.tensor([[1.0, -4.0, 3.0, 0.0]])
    assert torch.equal(fake_quantize_activations(x, group=2), x)
    # [10, 1.1]: 1.1 * 448 / 10 = 49.28; e4m3 spacing in [32, 64) is 4 -> 48 -> 48 * 10 / 448
    out = fake_quantize_activations(torch.tensor([[10.0, 1.1]]), group=2)
    torch.testing.assert_close(out, torch.tensor([[10.0, 480 / 448]]), rtol=1e-6, atol=0)
    # a width of 3 in groups of 2: the last value is a group of its own (exact: it is its own amax)
    out = fake_quantize_activations(torch.tensor([[10.0, 1.1, 0.37]]), group=2)
    assert out[0, 2] == torch.tensor(0.37)
    assert fake_quantize_activations(torch.zeros(2, 3)).abs().sum() == 0  # eps keeps the scale finite


def test_activation_error_bound_is_per_token_group():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 300)
    x[1, 2, 10] = 100.0  # one outlier: only its token's first group gets a coarse scale
    x[1, 2, 11] = x[1, 2, 140] = x[2, 2, 11] = 1e-4
    back = fake_quantize_activations(x)
    assert back.shape == x.shape and back.dtype == x.dtype
    groups = torch.nn.functional.pad(x, (0, 84)).view(5, 7, 3, 128)
    scale = (groups.abs().amax(-1, keepdim=True) / FP8_MAX).expand(-1, -1, -1, 128).reshape(5, 7, 384)[..., :300]
    assert ((back - x).abs() <= x.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12).all()
    # 1e-4 / (100 / 448) is below e4m3's smallest subnormal (2^-9): flushed to 0 next to the outlier only
    assert back[1, 2, 11] == 0 and back[1, 2, 140] != 0 and back[2, 2, 11] != 0


def test_w8a8_hooks_round_only_the_linear_inputs():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        exact = model(ids).logits
        handles = emulate_w8a8(model, group=16)
        assert len(handles) == 2 * 7
        up = model.model.layers[1].mlp.up_proj
        h = torch.randn(3, 32)
        torch.testing.assert_close(up(h), torch.nn.functional.linear(fake_quantize_activations(h, 16), up.weight))
        emulated = model(ids).logits
        assert 0 < (emulated - exact).abs().max() < 0.1
        for handle in handles:
            handle.remove()
        assert torch.equal(model(ids).logits, exact)
