"""TP / SP / PP / VPP layouts give the TP=1 per-sequence log-likelihoods and gradients on the same weights.

One spawn per world size runs every layout: rank-local TP=1 reference (same seed on all ranks), then
for each layout a fresh model whose weights are the reference's, sharded by a test-side helper.
"""
import launcher
import torch
import torch.distributed as dist

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.megatron import logprobs, packing, parallel
from megatron_rence.megatron.model import build_model

VOCAB = 100
SEED = 7
TEMPERATURE = 0.8
NUM_MICROBATCHES = 2
MODELS = {
    # Llama-3.1 style: GQA, RoPE with frequency scaling, untied embeddings
    "llama": ModelConfig(arch="llama", num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                         num_query_groups=2, rotary_base=500000.0, rope_scaling=True, max_position_embeddings=64,
                         make_vocab_size_divisible_by=8, dtype="fp32"),
    # Qwen-style features together: QKV bias (Qwen2), QK-norm (Qwen3), tied embeddings
    "qwen": ModelConfig(arch="qwen3", num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                        num_query_groups=2, kv_channels=32, rotary_base=1e6, add_qkv_bias=True, qk_layernorm=True,
                        tie_word_embeddings=True, norm_epsilon=1e-6, max_position_embeddings=64,
                        make_vocab_size_divisible_by=8, dtype="fp32"),
}


def _sequences():
    g = torch.Generator().manual_seed(0)
    lengths, prompts = [9, 13, 6, 11], [3, 5, 2, 4]
    return [(torch.randint(1, VOCAB, (n,), generator=g).tolist(), p) for n, p in zip(lengths, prompts)]


def _global_name(chunk, name: str) -> str:
    """decoder.layers.<local i> -> decoder.layers.<global i> (pipeline / virtual stage offset)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(chunk.decoder.layers[int(parts[2])].layer_number - 1)
    if parts[0] == "output_layer" and getattr(chunk, "share_embeddings_and_output_weights", False):
        return "embedding.word_embeddings.weight"  # the last stage's copy of a tied embedding
    return ".".join(parts)


def _shard(name: str, full: torch.Tensor, local_shape, tp_rank: int, tp: int) -> torch.Tensor:
    if name.endswith("linear_fc1.weight"):  # [gate; up], each split over TP
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
    if "linear_qkv" in name:  # rows interleaved per query group; TP splits whole groups
        return full.chunk(tp)[tp_rank]
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[tp_rank]
    if "word_embeddings" in name or "output_layer" in name:  # vocab rows; megatron's padding differs by TP
        rows = local_shape[0]
        out = torch.zeros(local_shape)
        src = full[tp_rank * rows:(tp_rank + 1) * rows]
        out[:len(src)] = src
        return out
    return full


def _unshard(name: str, local: torch.Tensor, st) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(st.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=st.tp_group)
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(p.chunk(2) for p in parts))
        return torch.cat(gates + ups)
    if "linear_qkv" in name:
        return torch.cat(parts)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(parts, dim=1)
    if "word_embeddings" in name or "output_layer" in name:
        return torch.cat(parts)[:VOCAB]
    return local


def _loglik_and_grads(chunks, st, pcfg: ParallelConfig):
    """Per-sequence log-likelihoods [B] (last stage, else None) and {global name: full gradient}."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    multiple = packing.pad_multiple(pcfg.tp, pcfg.cp, pcfg.sequence_parallel)
    batch = packing.pad_batch(_sequences(), pad_id=0, multiple=multiple)
    half = batch.tokens.shape[0] // NUM_MICROBATCHES
    microbatches = [packing.PaddedBatch(*(t[i * half:(i + 1) * half] for t in (
        batch.tokens, batch.position_ids, batch.targets, batch.loss_mask, batch.lengths, batch.prompt_lens)))
        for i in range(NUM_MICROBATCHES)]
    logliks = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb.tokens, mb.position_ids, None)

        def loss_func(logits):
            tok = logprobs.logprobs_from_logits(logits, mb, st.tp_group, TEMPERATURE, VOCAB, chunk_size=7)
            seq = logprobs.sequence_logprobs(tok, mb.loss_mask)
            logliks.append(seq.detach())
            return seq.sum() * NUM_MICROBATCHES, {"loglik": seq.detach()}  # the schedule divides by #mb

        return output, loss_func

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=[iter(microbatches) for _ in chunks],
        model=chunks, num_microbatches=NUM_MICROBATCHES, seq_length=batch.tokens.shape[1],
        micro_batch_size=half, forward_only=False)
    grads = {}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            grad = p.grad.clone()
            # what megatron's finalize_model_grads does: SP norms and QK-norm grads are partial per TP rank
            if st.tp_size > 1 and (getattr(p, "sequence_parallel", False) and pcfg.sequence_parallel
                                   or "q_layernorm" in name or "k_layernorm" in name):
                dist.all_reduce(grad, group=st.tp_group)
            gname = _global_name(chunk, name)
            if gname == "embedding.word_embeddings.weight" and chunk.share_embeddings_and_output_weights \
                    and st.pp_size > 1:
                dist.all_reduce(grad, group=st.embedding_group)  # tied embedding: first + last stage
            grads[gname] = _unshard(name, grad, st)
    return (torch.cat(logliks) if logliks else None), grads


def _reference(model_name: str):
    pcfg = ParallelConfig()
    st = parallel.initialize(pcfg, seed=SEED)
    chunks = build_model(MODELS[model_name], pcfg, VOCAB)
    state = {name: p.detach().clone() for name, p in chunks[0].named_parameters()}
    loglik, grads = _loglik_and_grads(chunks, st, pcfg)
    return state, loglik, grads


def _check_layout(model_name: str, layout: dict, ref) -> dict:
    state, ref_loglik, ref_grads = ref
    pcfg = ParallelConfig(**layout)
    st = parallel.initialize(pcfg, seed=SEED + 1)  # a different init: the loaded weights must be what counts
    chunks = build_model(MODELS[model_name], pcfg, VOCAB)
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                p.copy_(_shard(name, state[_global_name(chunk, name)], p.shape, st.tp_rank, st.tp_size))
    loglik, grads = _loglik_and_grads(chunks, st, pcfg)
    out = {"rank": st.rank, "num_grads": len(grads), "loglik_err": None, "max_grad_err": 0.0, "max_grad": 0.0}
    if loglik is not None:
        out["loglik_err"] = (loglik - ref_loglik).abs().max().item()
        out["loglik"] = loglik.tolist()
    for name, grad in grads.items():
        ref_grad = ref_grads[name][:VOCAB] if "word_embeddings" in name or "output_layer" in name else ref_grads[name]
        out["max_grad_err"] = max(out["max_grad_err"], (grad - ref_grad).abs().max().item())
        out["max_grad"] = max(out["max_grad"], ref_grad.abs().max().item())
    return out


def _vocab_parallel_function(st) -> dict:
    """The autograd Function on 2 vocabulary shards vs autograd through log_softmax of the full logits."""
    g = torch.Generator().manual_seed(11)
    vocab, padded = 37, 40  # the last shard holds 3 padding columns
    full = torch.randn(6, 5, padded, generator=g) * 2
    targets = torch.randint(0, vocab, (6, 5), generator=g)
    targets[0, :2] = packing.IGNORE
    weights = torch.randn(6, 5, generator=g)
    ref_in = full.clone().requires_grad_()
    ref = torch.log_softmax(ref_in[..., :vocab] / 0.7, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref = ref.masked_fill(targets < 0, 0.0)
    (ref * weights).sum().backward()
    local = full.chunk(st.tp_size, dim=-1)[st.tp_rank].clone().requires_grad_()
    out = logprobs.vocab_parallel_logprobs(local, targets, st.tp_group, 0.7, chunk_size=4, vocab_size=vocab)
    (out * weights).sum().backward()
    ent = logprobs.vocab_parallel_entropy(local.detach(), st.tp_group, 0.7, vocab_size=vocab)
    p = torch.softmax(full[..., :vocab] / 0.7, -1)
    return {"value_err": (out - ref).abs().max().item(),
            "grad_err": (local.grad - ref_in.grad.chunk(st.tp_size, -1)[st.tp_rank]).abs().max().item(),
            "entropy_err": (ent + (p * p.log()).sum(-1)).abs().max().item()}


def _cp_sum(st) -> dict:
    """sequence_logprobs over a 'context parallel' group (here: the world): forward sums, backward stays local."""
    tok = torch.full((2, 3), float(st.rank + 1), requires_grad=True)
    seq = logprobs.sequence_logprobs(tok, torch.ones(2, 3), cp_group=dist.group.WORLD)
    mean = logprobs.sequence_logprobs(tok, torch.ones(2, 3), length_normalize=True, cp_group=dist.group.WORLD)
    (seq * torch.tensor([1.0, 2.0])).sum().backward()
    return {"sum": seq.tolist(), "mean": mean.tolist(), "grad": tok.grad.tolist()}


def _world2():
    torch.set_num_threads(1)
    results = {}
    refs = {name: _reference(name) for name in MODELS}
    layouts = [("llama", dict(tp=2)), ("llama", dict(tp=2, sequence_parallel=True, recompute="selective")),
               ("llama", dict(pp=2, recompute="full")), ("llama", dict(pp=2, vpp=2)),
               ("qwen", dict(tp=2, sequence_parallel=True)), ("qwen", dict(pp=2))]
    for name, layout in layouts:
        results[f"{name} {layout}"] = _check_layout(name, layout, refs[name])
    st = parallel.initialize(ParallelConfig(tp=2), seed=SEED)
    results["function"] = _vocab_parallel_function(st)
    results["cp_sum"] = _cp_sum(st)
    parallel.destroy()
    return results


def _world4():
    torch.set_num_threads(1)
    ref = _reference("llama")
    out = {"llama tp2 pp2": _check_layout("llama", dict(tp=2, pp=2, sequence_parallel=True), ref)}
    parallel.destroy()
    return out


def _assert_layout(key: str, per_rank: list[dict]) -> None:
    last = [r for r in per_rank if r["loglik_err"] is not None]
    assert last, f"{key}: no rank computed log-likelihoods"
    for r in last:
        assert r["loglik_err"] < 2e-5, f"{key}: per-sequence log-likelihood differs by {r['loglik_err']}"
        assert all(v < -1.0 for v in r["loglik"]), f"{key}: implausible log-likelihoods {r['loglik']}"
    for r in per_rank:
        assert r["num_grads"] > 0
        assert r["max_grad"] > 1e-3, f"{key}: gradients vanished"
        assert r["max_grad_err"] < 2e-5 * max(1.0, r["max_grad"]), \
            f"{key}: rank {r['rank']} gradient differs by {r['max_grad_err']} (max {r['max_grad']})"


def test_two_ranks_tp_sp_pp_vpp_match_tp1():
    per_rank = launcher.run(_world2, 2, timeout=300)
    for key in per_rank[0]:
        if key in ("function", "cp_sum"):
            continue
        _assert_layout(key, [r[key] for r in per_rank])
    for r in per_rank:
        f = r["function"]
        assert f["value_err"] < 1e-5 and f["grad_err"] < 1e-5 and f["entropy_err"] < 1e-5, f
    # ranks hold 1s and 2s: sums over both ranks are 3*1 + 3*2 = 9, means 9/6; the gradient stays local
    for r in per_rank:
        assert r["cp_sum"]["sum"] == [9.0, 9.0] and r["cp_sum"]["mean"] == [1.5, 1.5]
        assert r["cp_sum"]["grad"] == [[1.0] * 3, [2.0] * 3]


def test_four_ranks_tp2_pp2_match_tp1():
    per_rank = launcher.run(_world4, 4, timeout=300)
    _assert_layout("llama tp2 pp2", [r["llama tp2 pp2"] for r in per_rank])
