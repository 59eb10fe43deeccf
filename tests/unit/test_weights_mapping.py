"""Pure weight layouts: interleaved QKV, fc1 TP re-chunk, vocab padding, TE names, buckets; HF->Megatron->HF is exact."""
import pytest
import torch
import transformers

from megatron_rence.config import ModelConfig
from megatron_rence.weights.mapping import Dims, get_mapping, merge_qkv, pad_vocab, split_qkv
from megatron_rence.weights.plan import TensorPlan, make_buckets, merge_tp_shards, split_tp_shards

TINY = dict(vocab_size=90, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=16)),
}


def hf_state(arch: str) -> tuple[dict, Dims]:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = config_cls(**TINY, **extra)
    sd = {k: v.detach().clone() for k, v in model_cls(config).state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # what save_pretrained writes for a tied model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return sd, Dims(4, 2, head_dim, 90, config.tie_word_embeddings)


def _plan(shape, tp_dim, fused=False) -> TensorPlan:
    return TensorPlan("x", 0, "x", 0, 0, shape, shape, torch.float32, tp_dim, fused)


def test_qkv_is_interleaved_per_query_group():
    # 2 groups x 2 query heads, head_dim 1: rows [q0, q1, k0, v0, q2, q3, k1, v1]
    dims = Dims(num_attention_heads=4, num_query_groups=2, head_dim=1, vocab_size=8, tie_word_embeddings=False)
    qkv = torch.arange(8.0).unsqueeze(1)
    q, k, v = split_qkv(qkv, dims)
    assert q.flatten().tolist() == [0, 1, 4, 5] and k.flatten().tolist() == [2, 6] and v.flatten().tolist() == [3, 7]
    assert torch.equal(merge_qkv(q, k, v, dims), qkv)
    shard0, shard1 = split_tp_shards(qkv, 0, False, 2)  # TP splits whole query groups
    assert shard0.flatten().tolist() == [0, 1, 2, 3] and shard1.flatten().tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="k_proj has shape"):
        merge_qkv(q, k[:1], v, dims)


def test_fc1_tp_shards_are_gate_up_pairs_and_merge_back():
    full = torch.arange(8.0).unsqueeze(1)  # gate rows 0..3, up rows 4..7
    shards = split_tp_shards(full, 0, True, 2)
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert torch.equal(merge_tp_shards(shards, _plan((8, 1), 0, fused=True)), full)
    # a plain column-parallel merge would interleave gate and up: the re-chunk matters
    assert not torch.equal(torch.cat(shards), full)
    proj = torch.arange(12.0).reshape(2, 6)  # row-parallel: split along the input dim
    assert torch.equal(merge_tp_shards(split_tp_shards(proj, 1, False, 3), _plan((2, 6), 1)), proj)


def test_vocab_padding_and_strip():
    emb = torch.randn(5, 3)
    padded = pad_vocab(emb, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], emb) and not padded[5:].any()
    dims = Dims(4, 2, 8, 5, False)
    (name, stripped), = get_mapping("llama").to_hf("embedding.word_embeddings.weight", padded, dims)
    assert name == "model.embed_tokens.weight" and torch.equal(stripped, emb)
    with pytest.raises(ValueError, match="does not fit"):
        pad_vocab(emb, 4)


@pytest.mark.parametrize("te_spec", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_megatron_hf_round_trip_is_bit_exact(arch, te_spec):
    hf, dims = hf_state(arch)
    mapping = get_mapping(arch, te_spec=te_spec)
    mg = mapping.from_hf(hf, num_layers=2, dims=dims, padded_vocab=96)
    assert mg["embedding.word_embeddings.weight"].shape == (96, 32)
    assert ("output_layer.weight" in mg) == (not dims.tie_word_embeddings)
    qkv_rows = 2 * (2 + 2) * dims.head_dim
    assert mg["decoder.layers.1.self_attention.linear_qkv.weight"].shape == (qkv_rows, 32)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in mg) == (arch == "qwen2")
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in mg) == (arch == "qwen3")
    norm = "self_attention.linear_qkv.layer_norm_weight" if te_spec else "input_layernorm.weight"
    assert torch.equal(mg[f"decoder.layers.1.{norm}"], hf["model.layers.1.input_layernorm.weight"])
    back = {}
    for name, tensor in mg.items():
        for hf_name, t in mapping.to_hf(name, tensor, dims):
            assert hf_name not in back, hf_name
            back[hf_name] = t
    assert set(back) == set(hf)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name


def test_tied_output_layer_reads_the_embedding():
    hf, dims = hf_state("qwen2")
    out = get_mapping("qwen2").from_hf_tensor("output_layer.weight", hf.__getitem__, dims, 96)
    assert torch.equal(out[:90], hf["model.embed_tokens.weight"])
    assert get_mapping("qwen2").to_hf("output_layer.weight", out, dims) == []  # exported once, as the embedding


def test_mapping_errors_name_the_tensor():
    hf, dims = hf_state("llama")
    with pytest.raises(ValueError, match="model.arch.*gpt2"):
        get_mapping("gpt2")
    with pytest.raises(ValueError, match="decoder.layers.0.mlp.router.weight"):
        get_mapping("llama").to_hf("decoder.layers.0.mlp.router.weight", torch.zeros(1), dims)
    del hf["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        get_mapping("llama").from_hf(hf, 2, dims, 96)
    with pytest.raises(ValueError, match="model.add_qkv_bias=False.*qwen2"):
        get_mapping("qwen2").check(ModelConfig(arch="qwen2", add_qkv_bias=False))


def test_buckets_respect_the_byte_limit_and_keep_order():
    sizes = [10, 30, 25, 100, 5, 5, 40]  # fp32 elements -> 4 bytes each
    plans = [TensorPlan(f"t{i}", 0, f"t{i}", 0, 0, (n,), (n,), torch.float32, None, False) for i, n in enumerate(sizes)]
    buckets = make_buckets(plans, bucket_bytes=160)
    assert [[p.name for p in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"]]
    for bucket in buckets:
        assert len(bucket) == 1 or sum(p.full_bytes for p in bucket) <= 160
    assert [p.name for b in buckets for p in b] == [p.name for p in plans]
    assert len(make_buckets(plans, 1)) == len(plans)  # every tensor bigger than a bucket travels alone
    with pytest.raises(ValueError, match="weights.bucket_bytes"):
        make_buckets(plans, 0)
