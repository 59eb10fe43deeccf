"""Layout checks for a recipe on a given cluster: what megatron, the packer and SGLang would reject, and what is wasteful.

``config.validate`` (run when the recipe loads) covers the checks that need no world size; this module adds
``config.check_world_size`` and the rules that need the cluster or the resolved architecture: divisibility of
heads, KV groups and ffn by TP (also when ``model.hf_path`` filled the architecture), layers by pp*vpp,
vocabulary size and padding, interleaved-schedule microbatch rules, sequence/context parallel rules, FP8
shapes, the colocated engine's TP against the node and the heads, and features that need a GPU.
Errors stop the launch; warnings are printed and do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_rence.config import Config, ConfigError, check_world_size
from megatron_rence.planning.memory import Hardware


@dataclass
class Layout:
    world_size: int
    dp: int = 0
    num_microbatches: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_layout(cfg: Config, hw: Hardware, vocab_size: int, on_cpu: bool) -> Layout:
    """All layout errors and warnings for `cfg` on `hw`; `vocab_size` is the tokenizer's (0 = unknown)."""
    out = Layout(world_size=hw.world_size)
    err, warn = out.errors.append, out.warnings.append
    m, p, t, r = cfg.model, cfg.parallel, cfg.train, cfg.rollout
    if hw.nodes < 1 or hw.gpus_per_node < 1:
        err(f"--nodes {hw.nodes} --gpus-per-node {hw.gpus_per_node}: both must be >= 1")
        return out
    try:
        out.dp = check_world_size(cfg, hw.world_size, source="layout")
        # with a token budget, the most microbatches a step can take: one whole group each
        per_mb = r.num_samples if t.max_tokens_per_microbatch else t.micro_batch_size
        out.num_microbatches = t.global_batch_size // (per_mb * out.dp)
    except ConfigError as exc:
        err(str(exc))
    _check_model(cfg, vocab_size, err)
    if p.vpp is not None and out.num_microbatches:
        if out.num_microbatches < p.pp or out.num_microbatches % p.pp:
            err(f"parallel.vpp: the interleaved schedule needs the number of microbatches per step "
                f"({out.num_microbatches} = train.global_batch_size / (micro_batch_size * dp)) to be a "
                f"multiple of parallel.pp={p.pp}")
    elif out.num_microbatches and out.num_microbatches < p.pp:
        warn(f"train.global_batch_size: {out.num_microbatches} microbatches per step < parallel.pp={p.pp}: "
             f"the pipeline idles most of the step")
    if p.tp > 1 and not p.sequence_parallel:
        warn(f"parallel.sequence_parallel is off with tp={p.tp}: norm and linear inputs are replicated on every "
             f"TP rank (about 8*h bytes per token per layer); turn it on")
    if m.fp8 is not None:
        for key, dim in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size", m.ffn_hidden_size)):
            if (dim // p.tp) % 16:
                err(f"{key}: FP8 GEMMs need {key.split('.')[1]}/tp={dim // p.tp} to be a multiple of 16")
    if on_cpu:
        for key, bad in (("parallel.distributed_optimizer", p.distributed_optimizer),
                         ("model.fp8", m.fp8 is not None), ("rollout.engine", r.engine == "sglang")):
            if bad:
                err(f"{key}: needs CUDA (train.device=cpu); FP8 needs Transformer Engine, "
                    f"the distributed optimizer and SGLang need GPUs")
    if r.engine == "sglang":
        _check_engine(cfg, hw, err)
    _check_batches(cfg, warn)
    return out


def _check_model(cfg: Config, vocab_size: int, err) -> None:
    m, p = cfg.model, cfg.parallel
    if m.num_attention_heads % m.num_query_groups:
        err(f"model.num_query_groups: {m.num_query_groups} does not divide model.num_attention_heads="
            f"{m.num_attention_heads}")
    for key, value in (("model.num_attention_heads", m.num_attention_heads),
                       ("model.num_query_groups", m.num_query_groups),
                       ("model.ffn_hidden_size", m.ffn_hidden_size)):
        if value % p.tp:
            err(f"parallel.tp: {key}={value} is not divisible by tp={p.tp}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        err(f"parallel.pp: model.num_layers={m.num_layers} is not divisible by pp*vpp={stages}")
    if vocab_size < 1:
        err("model.vocab_size: unknown; set it (0 means 'from the tokenizer', which could not be read here)")


def _check_engine(cfg: Config, hw: Hardware, err) -> None:
    m, s = cfg.model, cfg.rollout.sglang
    if s.tp < 1:
        err(f"rollout.sglang.tp: must be >= 1, got {s.tp}")
        return
    if hw.gpus_per_node % s.tp:
        err(f"rollout.sglang.tp: {s.tp} does not divide --gpus-per-node {hw.gpus_per_node}: each colocated "
            f"engine must sit inside one node")
    if m.num_attention_heads % s.tp:
        err(f"rollout.sglang.tp: model.num_attention_heads={m.num_attention_heads} is not divisible by {s.tp}")
    if not 0.0 < s.mem_fraction_static < 1.0:
        err(f"rollout.sglang.mem_fraction_static: must be in (0, 1), got {s.mem_fraction_static}")
    problem = sglang_fp8_shape_error(m, s.tp) if s.fp8_weights else None
    if problem:
        err(problem)


def sglang_fp8_shape_error(model_cfg, engine_tp: int) -> Optional[str]:
    """The error for rollout.sglang.fp8_weights with a model SGLang's block FP8 refuses (None if it loads);
    the planner and the engine's start (rollout/sglang_engine.py) both report it."""
    m = model_cfg
    problems = sglang_block_shape_problems(m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim,
                                           m.ffn_hidden_size, engine_tp)
    if not problems:
        return None
    return (f"rollout.sglang.fp8_weights: SGLang's 128x128 block FP8 needs whole blocks per shard: "
            f"{'; '.join(problems)} (at rollout.sglang.tp={engine_tp}); serve this model in bf16 (fp8_weights=false)")


def sglang_block_shape_problems(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                ffn_hidden_size: int, engine_tp: int, block: int = 128) -> list[str]:
    """Why SGLang's block-FP8 linear layers would refuse this architecture at engine TP `engine_tp` ([] if
    none). SGLang (as vLLM) splits each merged or TP-sharded weight's scale blocks per shard, so every shard
    must hold whole 128-row blocks: q, k, v (merged qkv_proj) and gate, up (merged gate_up_proj) rows per
    engine rank, and with engine TP > 1 the row-parallel o_proj / down_proj columns per rank. Activations are
    quantised per 128-column group, so the hidden size (the input of q/k/v and gate/up) must be whole groups."""
    kv_per_rank = max(1, num_kv_heads // engine_tp) * head_dim  # kv heads are replicated when tp > num_kv_heads
    q_per_rank, ffn_per_rank = num_heads * head_dim // engine_tp, ffn_hidden_size // engine_tp
    per_rank = [("q_proj rows", q_per_rank), ("k_proj / v_proj rows", kv_per_rank),
                ("gate_proj / up_proj rows", ffn_per_rank)]
    if engine_tp > 1:
        per_rank += [("o_proj columns", q_per_rank), ("down_proj columns", ffn_per_rank)]
    checks = [("hidden_size (q/k/v, gate/up input columns)", hidden_size)]
    checks += [(f"{what} per engine rank", size) for what, size in per_rank]
    return [f"{what} = {size} is not a multiple of the {block}-wide FP8 block"
            for what, size in checks if size % block]


def _check_batches(cfg: Config, warn) -> None:
    m, t, r, d = cfg.model, cfg.train, cfg.rollout, cfg.data
    if (cfg.objective.name in ("rence", "online_dpo") and not t.max_tokens_per_microbatch
            and t.micro_batch_size % r.num_samples):
        warn(f"train.micro_batch_size={t.micro_batch_size} is not a multiple of rollout.num_samples="
             f"{r.num_samples}: {cfg.objective.name} contrasts the samples of a group, which then span microbatches")
    if d.max_prompt_len + r.max_new_tokens > t.max_seq_len:
        warn(f"train.max_seq_len={t.max_seq_len} < data.max_prompt_len + rollout.max_new_tokens="
             f"{d.max_prompt_len + r.max_new_tokens}: the longest prompt + response would not fit")
    if t.max_seq_len > m.max_position_embeddings:
        warn(f"train.max_seq_len={t.max_seq_len} > model.max_position_embeddings={m.max_position_embeddings}")
