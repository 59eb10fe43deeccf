"""GPU: Transformer Engine layer spec in BF16, TE FP8 recipes, THD packing, and vocab-parallel log-prob memory.

Skipped without CUDA (conftest); the TE tests also without Transformer Engine (importorskip). One process, TP=1.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

from megatron_rence.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_rence.megatron import logprobs as lp  # noqa: E402
from megatron_rence.megatron import packing, parallel  # noqa: E402
from megatron_rence.megatron.model import build_model  # noqa: E402

VOCAB = 1000
CFG = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
           max_position_embeddings=256, make_vocab_size_divisible_by=128, dtype="bf16")


@pytest.fixture(scope="module")
def cuda_state():
    state = parallel.initialize(ParallelConfig(), seed=5)
    yield state
    parallel.destroy()


@pytest.fixture
def gpu_state(cuda_state):
    """For the tests that need Transformer Engine (skipped where it does not import)."""
    pytest.importorskip("transformer_engine")
    return cuda_state


def _sequences(n=4):
    g = torch.Generator().manual_seed(0)
    lengths = [37, 64, 21, 50][:n]
    return [(torch.randint(1, VOCAB, (length,), generator=g).tolist(), 5) for length in lengths]


def _padded_logliks(model, state, batch, chunk_size=None):
    batch = batch.to(state.device)
    logits = model(batch.tokens, batch.position_ids, None)
    tok = lp.logprobs_from_logits(logits, batch, state.tp_group, 1.0, VOCAB, chunk_size)
    return lp.sequence_logprobs(tok, batch.loss_mask), logits


def test_local_spec_bf16_on_a_gpu(cuda_state):
    """model.transformer_impl=local on a GPU (with or without Transformer Engine): the local spec in bf16."""
    model = build_model(ModelConfig(**CFG, transformer_impl="local"), ParallelConfig(), VOCAB)[0]
    names = dict(model.named_parameters())
    assert "decoder.layers.0.input_layernorm.weight" in names
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in names.values())
    loglik, _ = _padded_logliks(model, cuda_state, packing.pad_batch(_sequences(), pad_id=0))
    assert torch.isfinite(loglik).all() and (loglik < 0).all()
    loglik.sum().backward()
    assert model.decoder.layers[0].mlp.linear_fc2.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.fp8='delayed' needs Transformer Engine: set model.transformer_impl"):
        build_model(ModelConfig(**CFG, fp8="delayed", transformer_impl="local"), ParallelConfig(), VOCAB)


def test_default_spec_on_a_gpu_is_te_or_says_why_not(cuda_state):
    """The default model.transformer_impl on a real GPU: TE layers, or (TE missing / broken) an error naming the
    import's exception, never the local spec silently."""
    from megatron_rence.megatron.model import te_import_error

    problem = te_import_error()
    if problem is not None:
        with pytest.raises(ValueError, match="Transformer Engine does not import on this CUDA machine"):
            build_model(ModelConfig(**CFG), ParallelConfig(), VOCAB)
        return
    names = dict(build_model(ModelConfig(**CFG), ParallelConfig(), VOCAB)[0].named_parameters())
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names


def test_te_spec_bf16_forward_backward(gpu_state, monkeypatch):
    from megatron_rence.megatron import model as model_module

    # a bare module (no DDP, so no main_grad): without gradient_accumulation_fusion, which writes into main_grad
    monkeypatch.setattr(model_module, "grad_accum_extension_available", lambda: False)
    model = build_model(ModelConfig(**CFG), ParallelConfig(), VOCAB)[0]
    assert model.config.apply_rope_fusion and not model.config.gradient_accumulation_fusion
    names = dict(model.named_parameters())
    # TE fuses the pre-attention / pre-MLP norms into the following linear layers
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in names.values())
    batch = packing.pad_batch(_sequences(), pad_id=0, multiple=16)
    loglik, logits = _padded_logliks(model, gpu_state, batch)
    assert logits.dtype == torch.bfloat16 and logits.shape[-1] == 1024
    assert torch.isfinite(loglik).all() and (loglik < 0).all()
    loglik.sum().backward()
    grad = model.decoder.layers[0].mlp.linear_fc2.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_thd_packing_matches_padded(gpu_state):
    model = build_model(ModelConfig(**CFG), ParallelConfig(), VOCAB)[0].eval()
    seqs = _sequences()
    with torch.no_grad():
        padded, _ = _padded_logliks(model, gpu_state, packing.pad_batch(seqs, pad_id=0, multiple=16))
        packed = packing.pack_thd(seqs, pad_id=0, multiple=16).to(gpu_state.device)
        logits = model(packed.tokens, packed.position_ids, None, packed_seq_params=packed.packed_seq_params())
        tok = lp.logprobs_from_logits(logits, packed, gpu_state.tp_group, 1.0, VOCAB)
        thd = lp.sequence_logprobs(tok, packed.loss_mask, seq_index=packed.seq_index,
                                   num_sequences=packed.num_sequences)
    torch.testing.assert_close(thd, padded, rtol=2e-2, atol=0.5)  # bf16 kernels differ between layouts


def test_local_spec_thd_with_offsets_on_the_host_matches_padded(cuda_state, monkeypatch):
    """Without TE, packed batches keep cu_seqlens on the host (model.local_thd_offsets_on_host): the unfused THD
    RoPE and LocalCoreAttention read them without a device sync, and the result equals the padded layout."""
    from megatron_rence.megatron import model as model_module

    local = ModelConfig(**{**CFG, "transformer_impl": "local"})
    assert model_module.local_thd_offsets_on_host(True, local)
    model = build_model(local, ParallelConfig(), VOCAB)[0].eval()
    assert not model.config.apply_rope_fusion and not model.config.gradient_accumulation_fusion
    seqs = _sequences()
    with torch.no_grad():
        padded, _ = _padded_logliks(model, cuda_state, packing.pad_batch(seqs, pad_id=0))
        host = packing.pack_thd(seqs, pad_id=0)
        packed = host.to(cuda_state.device)
        params = host.packed_seq_params()
        params.cp_group = cuda_state.cp_group
        assert not params.cu_seqlens_q.is_cuda
        logits = model(packed.tokens, packed.position_ids, None, packed_seq_params=params)
        tok = lp.logprobs_from_logits(logits, packed, cuda_state.tp_group, 1.0, VOCAB)
        thd = lp.sequence_logprobs(tok, packed.loss_mask, seq_index=packed.seq_index,
                                   num_sequences=packed.num_sequences)
    torch.testing.assert_close(thd, padded, rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_recipes_train_close_to_bf16(gpu_state, recipe):
    from megatron_rence.megatron.model import fp8_unsupported

    problem = fp8_unsupported(recipe)
    if problem:
        pytest.skip(f"FP8 {recipe}: {problem}")
    seqs = _sequences()
    batch = packing.pad_batch(seqs, pad_id=0, multiple=packing.pad_multiple(
        fp8_align=packing.fp8_align_for(recipe), rows=len(seqs)))
    state = parallel.initialize(ParallelConfig(), seed=5)
    reference, _ = _padded_logliks(build_model(ModelConfig(**CFG), ParallelConfig(), VOCAB)[0], state, batch)
    state = parallel.initialize(ParallelConfig(), seed=5)  # same seed: same initial weights
    model = build_model(ModelConfig(fp8=recipe, **CFG), ParallelConfig(), VOCAB)[0]
    assert model.config.fp8 is not None and model.config.fp8_recipe == recipe
    loglik, _ = _padded_logliks(model, state, batch)
    loglik.sum().backward()
    assert torch.isfinite(loglik).all()
    # FP8 GEMMs perturb but must not wreck the log-likelihoods of a freshly initialised model
    torch.testing.assert_close(loglik, reference.detach(), rtol=0.05, atol=2.0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_logprob_memory_is_one_chunk(cuda_state):
    """The fp32 working set stays one [chunk, V] buffer, far below a full fp32 copy of the logits."""
    tokens, vocab, chunk = 8192, 151936, 1024
    logits = torch.randn(tokens, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = lp.vocab_parallel_logprobs(logits, targets, chunk_size=chunk)
    forward_peak = torch.cuda.max_memory_allocated() - base
    out.sum().backward()
    full_fp32 = tokens * vocab * 4
    assert forward_peak < 3 * chunk * vocab * 4 < full_fp32 / 2
    ref = torch.log_softmax(logits.detach()[:64].float(), -1).gather(1, targets[:64, None]).squeeze(1)
    torch.testing.assert_close(out[:64].detach(), ref, rtol=1e-5, atol=1e-5)
