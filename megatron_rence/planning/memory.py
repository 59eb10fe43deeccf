"""Per-GPU memory of a colocated run: trainer states, activations, the rollout engine, per phase and at the peak.

The model follows what the code does in each phase (train.py, megatron/offload.py); all figures are per GPU,
for the worst pipeline stage; 1 GiB = 2**30 bytes:

  trainer (megatron/offload.py: gradients and optimizer state leave the GPU before each weight sync and come
  back after the engine released its memory; parameters too after the sync with train.offload_params)
    weights      params_on_rank * dtype bytes (bf16/fp16: 2, fp32: 4): train, sync, and rollout unless
                 train.offload_params
    gradients    params_on_rank * grad bytes (megatron's fp32 main-grad buffer by default; --grad-dtype bf16):
                 train only (offload_grad_buffers frees the storage)
    optimizer    Adam: fp32 master copy (when weights are 16-bit) + exp_avg + exp_avg_sq = 12 (or 8) bytes per
                 param; the distributed optimizer shards them over the data-parallel group with context
                 parallel (dp * cp); table "distributed optimizer" in megatron's docs: 6 + 12/d for bf16:
                 train only (offload_to_cpu), every phase with train.offload_optimizer=false
    reference    a second copy of the weights when the objective needs a reference policy (KL, online DPO):
                 train, and rollout / sync unless train.offload_params
    fp8 cache    FP8 training keeps FP8 copies (and transposes) of linear weights: 2 bytes per linear param,
                 every phase (not offloaded)
  trainer, training phase only
    activations  ``activations.stage_activation_bytes`` (Korthikanti et al. 2022 per layer, pipeline in-flight)
    log-probs    last stage: output-layer logits [tokens, V/tp] and their gradient (16-bit each) plus one fp32
                 working chunk of at most 256 MiB (``megatron.logprobs``), plus the final-norm/output inputs
  engine (SGLang, colocated at rollout.sglang.tp)
    static pool  mem_fraction_static * F, F = the least free memory over the engine's GPUs when its model
                 runner starts (SGLang 0.5.5.post3 model_runner: ``min_per_gpu_memory`` = get_available_gpu_memory
                 over the TP group after init_torch_distributed; profile_max_num_token: KV = free_after_weights -
                 F * (1 - fraction) = fraction * F - weights). train.py starts the engine before the trainer
                 allocates anything (then releases it until the first sync), so F = GPU memory - --context-gb
                 (the trainer's and the engine's CUDA contexts and NCCL / custom all-reduce setup). An engine
                 restarted after a crash starts during rollout, next to the trainer's rollout residue:
                 fraction * (F - residue), reported as kv_tokens_after_restart.
    weights      params * 2 bytes / engine tp (linear weights at 1 byte with rollout.sglang.fp8_weights)
    KV cache     static pool - engine weights; tokens = KV bytes / (2 * layers * kv_heads_per_rank * head_dim * 2)
    request table  SGLang's ReqToTokenPool, allocated after the pool is sized, so outside it: int32
                 [max_num_reqs, context_len + 4] with max_num_reqs = min(max(int(KV tokens / context_len * 512),
                 2048), 4096) (model_runner.init_memory_pool) and context_len = model.max_position_embeddings
                 (hf_transformers_utils.get_context_length: llama3 rope scaling keeps it) or the
                 context_length of rollout.sglang.extra_args; in the kv_cache region, so released with it
    released     with rollout.sglang.enable_memory_saver the engine frees weights and KV during training and
                 weight sync (torch_memory_saver); without it the whole static pool stays
    residue      --engine-residue-gb in every phase: what release_memory_occupation does not free (the
                 scheduler's CUDA context, NCCL / custom all-reduce buffers, attention workspaces; an estimate
                 until measured with SGLang on a GPU)
    KV needed    every sequence of a step at full length at once: prompts_per_step * num_samples *
                 (data.max_prompt_len + rollout.max_new_tokens) / number of engines (kv_tokens_needed)
  reserve        --reserve-gb in every phase: CUDA contexts, NCCL buffers, SGLang's CUDA graphs and forward
                 activations, allocator fragmentation

  phases: rollout = trainer residue (weights, reference) + engine static pool + engine residue + reserve
          sync    = trainer weights (+ reference) + engine weights + 2 * weights.bucket_bytes (3 with
                    weights.overlap_gather: the next bucket's all-gathers are in flight)
                    + (KV if not released) + engine residue + reserve
          train   = trainer weights + gradients + optimizer + activations + log-probs
                    + (static pool if not released) + engine residue + reserve
  peak = max over phases; the run fits when peak <= GPU memory.

With the transformers engine (CPU runs) the engine holds a full copy of the weights and a KV cache that
grows with its share of the step's sequences (no static pool, nothing released).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_rence.config import Config, samples_per_prompt
from megatron_rence.planning.activations import layer_activation, stage_activation_bytes
from megatron_rence.planning.params import ModelParams, layer_params, model_params, padded_vocab_size, stage_params

GiB = 1024 ** 3
LOGPROB_CHUNK_BYTES = 256 * 1024 * 1024  # megatron.logprobs.DEFAULT_CHUNK_BYTES (tests keep them equal)
PHASES = ("rollout", "train", "sync")
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Hardware:
    """What the planner is told about the cluster and the assumptions it cannot read from the recipe."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 79.65  # GiB per GPU: H100 80GB HBM3 reports 81,559 MiB (nvidia-smi)
    context_gb: float = 2.0  # GiB per GPU taken before the engine sizes its pool: CUDA contexts + NCCL (estimate)
    reserve_gb: float = 6.0  # GiB per GPU kept out of every phase
    engine_residue_gb: float = 1.0  # GiB per GPU the SGLang process keeps after releasing its memory
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
    flash_attention: bool = True

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Item:
    name: str
    bytes: float
    phases: tuple[str, ...]
    note: str = ""
    trainer: bool = False  # the trainer's (counted in rollout_trainer_resident)


@dataclass
class EngineInfo:
    """The rollout engine's share of the GPU and what its KV cache holds."""

    kind: str
    tp: int
    num_engines: int
    weights_bytes: float
    kv_bytes: float
    kv_bytes_per_token: float  # per GPU of the engine
    sequences_per_engine: int
    model_bytes: float  # the whole model in the engine's dtype (what one full weight sync moves)
    kv_tokens_needed: int = 0  # every sequence of a step at full length at once, per engine
    pool_fraction: float = 0.0  # SGLang mem_fraction_static (0: no static pool)
    free_at_start: float = 0.0  # F: bytes free on each engine GPU when the engine sizes its pool
    context_len: int = 0  # SGLang's context length (its request table's row length - 4)

    @property
    def kv_tokens(self) -> int:
        return self.tokens_in(self.kv_bytes)

    def tokens_in(self, kv_bytes: float) -> int:
        return int(kv_bytes // self.kv_bytes_per_token) if kv_bytes > 0 else 0


@dataclass
class StageMemory:
    stage: int
    items: list[Item]
    totals: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.totals = {ph: sum(i.bytes for i in self.items if ph in i.phases) for ph in PHASES}

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=lambda ph: self.totals[ph])

    @property
    def peak(self) -> float:
        return self.totals[self.peak_phase]


@dataclass
class MemoryPlan:
    params: ModelParams
    padded_vocab: int
    tokens_per_microbatch: int  # per rank
    engine: EngineInfo
    stages: list[StageMemory]
    gpu_bytes: float

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.gpu_bytes and self.engine.kv_bytes > 0

    @property
    def rollout_trainer_resident(self) -> float:
        """Bytes the trainer keeps on a GPU during rollout (the most over pipeline stages)."""
        return max(sum(i.bytes for i in s.items if i.trainer and "rollout" in i.phases) for s in self.stages)

    @property
    def kv_tokens_after_restart(self) -> int:
        """KV tokens per engine GPU of an engine restarted during rollout (it starts next to the trainer's
        rollout residue: its pool is mem_fraction_static of what is left); 0 for engines without a pool."""
        e = self.engine
        if e.kind != "sglang":
            return 0
        return e.tokens_in(e.pool_fraction * (e.free_at_start - self.rollout_trainer_resident) - e.weights_bytes)


def needs_reference(cfg: Config) -> bool:
    o = cfg.objective
    return o.kl_coef > 0 or o.kl_target is not None or o.name == "online_dpo"


def padded_seq_len(cfg: Config) -> int:
    """train.max_seq_len rounded up to the packer's multiple (SP: tp; CP: 2*cp; FP8: 16)."""
    p, multiple = cfg.parallel, 1
    if p.sequence_parallel and p.tp > 1:
        multiple = math.lcm(multiple, p.tp)
    if p.cp > 1:
        multiple = math.lcm(multiple, 2 * p.cp)
    if cfg.model.fp8 is not None:
        multiple = math.lcm(multiple, 16)
    return -(-cfg.train.max_seq_len // multiple) * multiple


def engine_info(cfg: Config, hw: Hardware, params: ModelParams, on_cpu: bool) -> EngineInfo:
    m, r = cfg.model, cfg.rollout
    sequences = r.prompts_per_step * samples_per_prompt(cfg)  # as sampled (hard negatives: K + extra)
    step_tokens = sequences * (cfg.data.max_prompt_len + r.max_new_tokens)
    if r.engine == "hf":  # one transformers engine per rank, full weights, KV grows with its sequences
        act = 4 if on_cpu else _DTYPE_BYTES[m.dtype]
        per_token = 2 * m.num_layers * m.num_query_groups * m.head_dim * act
        share = -(-sequences // hw.world_size)
        return EngineInfo("hf", 1, hw.world_size, params.total * act, share * cfg.train.max_seq_len * per_token,
                          per_token, share, params.total * act, -(-step_tokens // hw.world_size))
    tp = r.sglang.tp
    linear_bytes = 1 if r.sglang.fp8_weights else 2
    weights = ((params.total - params.linear) * 2 + params.linear * linear_bytes) / tp
    kv_heads = max(1, m.num_query_groups // tp)  # SGLang replicates KV heads when tp > groups
    per_token = 2 * m.num_layers * kv_heads * m.head_dim * 2
    free = (hw.gpu_mem_gb - hw.context_gb) * GiB
    kv = r.sglang.mem_fraction_static * free - weights
    engines = hw.world_size // tp
    context_len = int(r.sglang.extra_args.get("context_length", m.max_position_embeddings))
    return EngineInfo("sglang", tp, engines, weights, kv, per_token, -(-sequences // engines), weights * tp,
                      -(-step_tokens // engines), r.sglang.mem_fraction_static, free, context_len)


def request_table_bytes(e: EngineInfo) -> float:
    """SGLang's ReqToTokenPool on each engine GPU (int32 [max_num_reqs, context_len + 4]), see the docstring."""
    max_num_reqs = min(max(int(e.kv_tokens / e.context_len * 512), 2048), 4096)
    return float(max_num_reqs * (e.context_len + 4) * 4)


def memory_plan(cfg: Config, hw: Hardware, vocab_size: int, dp: int, num_microbatches: int,
                on_cpu: bool = False) -> MemoryPlan:
    """Per-stage memory items; `dp` and `num_microbatches` come from the layout checks."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    params = model_params(m, vocab_size)
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tp)
    dtype_bytes = 4 if on_cpu else _DTYPE_BYTES[m.dtype]
    # a token budget bounds a packed microbatch (train.micro_batch_size then sets nothing); else the padded worst case
    tokens = (t.max_tokens_per_microbatch or t.micro_batch_size * padded_seq_len(cfg)) // p.cp
    layer = layer_activation(m, p.tp, p.sequence_parallel, padded_seq_len(cfg), act_bytes=dtype_bytes,
                             flash=hw.flash_attention and not on_cpu)
    engine = engine_info(cfg, hw, params, on_cpu)
    stages = []
    for sp in stage_params(m, p, vocab_size):
        items = _trainer_items(cfg, hw, sp.params, dp, dtype_bytes, on_cpu)
        acts = stage_activation_bytes(m, p, sp.stage, num_microbatches, tokens, layer)
        items.append(Item("activations", acts, ("train",),
                          f"recompute={p.recompute}, {tokens} tokens/microbatch"))
        if sp.has_output:
            items.append(Item("log-probs (logits)", _logits_bytes(tokens, padded // p.tp, m.hidden_size, p,
                                                                  dtype_bytes), ("train",),
                              f"[{tokens}, {padded // p.tp}] logits + grad + fp32 chunk"))
        items.extend(_engine_items(cfg, hw, engine))
        items.append(Item("reserve", hw.reserve_gb * GiB, PHASES, "CUDA contexts, NCCL, CUDA graphs, fragmentation"))
        stages.append(StageMemory(sp.stage, items))
    return MemoryPlan(params, padded, tokens, engine, stages, hw.gpu_mem_gb * GiB)


def _trainer_items(cfg: Config, hw: Hardware, n: int, dp: int, dtype_bytes: int, on_cpu: bool) -> list[Item]:
    m, p = cfg.model, cfg.parallel
    grad_bytes = 4 if (on_cpu or hw.grad_dtype == "fp32") else 2
    opt_bytes = 8 if dtype_bytes == 4 else 12
    shard = dp * p.cp if p.distributed_optimizer else 1
    moved = cfg.train.offload_params
    weight_phases = ("train", "sync") if moved else PHASES
    items = [
        Item("weights", n * dtype_bytes, weight_phases, f"{n / 1e9:.3f} B params on this GPU"
             + (", on CPU during rollout (train.offload_params)" if moved else ""), trainer=True),
        Item("gradients", n * grad_bytes, ("train",), ("fp32 main grads" if grad_bytes == 4 else "bf16 grads")
             + ", freed during rollout and sync", trainer=True),
        Item("optimizer", n * opt_bytes / shard, ("train",) if cfg.train.offload_optimizer else PHASES,
             f"Adam {opt_bytes} B/param" + (f", sharded over dp*cp={shard}" if shard > 1 else "")
             + (", on CPU during rollout and sync" if cfg.train.offload_optimizer else ", kept on the GPU"),
             trainer=True),
    ]
    if needs_reference(cfg):
        items.append(Item("reference weights", n * dtype_bytes, ("train",) if moved else PHASES,
                          "reference policy" + (", on CPU outside training" if moved else " kept on the GPU"),
                          trainer=True))
    if m.fp8 is not None and not on_cpu:
        lp = layer_params(m)
        linear = (m.num_layers // p.pp) * (lp.attention + lp.mlp) // p.tp  # the layers' GEMM weights on this rank
        items.append(Item("fp8 weight cache", linear * 2, PHASES, "FP8 copy + transpose of linear weights",
                          trainer=True))
    return items


def _logits_bytes(tokens: int, vocab_per_rank: int, hidden: int, p, act_bytes: int) -> float:
    logits = tokens * vocab_per_rank * act_bytes
    chunk = min(LOGPROB_CHUNK_BYTES, tokens * vocab_per_rank * 4)
    head_inputs = 2 * tokens * hidden * act_bytes / (p.tp if p.sequence_parallel else 1)
    return 2 * logits + chunk + head_inputs


def _engine_items(cfg: Config, hw: Hardware, e: EngineInfo) -> list[Item]:
    bucket = min(cfg.weights.bucket_bytes, e.model_bytes)  # a bucket never holds more than the whole model
    ahead = cfg.weights.overlap_gather and bucket < e.model_bytes  # the next bucket's gathers in flight
    buckets = Item("weight-sync buckets", (3 if ahead else 2) * bucket, ("sync",),
                   "gathered bucket + engine copy" + (" + next bucket's gathers" if ahead else ""))
    if e.kind == "hf":
        return [Item("engine weights (hf)", e.weights_bytes, PHASES, "full model per rank, never released"),
                Item("engine KV cache (hf)", e.kv_bytes, ("rollout",),
                     f"{e.sequences_per_engine} sequences x max_seq_len"), buckets]
    released = cfg.rollout.sglang.enable_memory_saver
    return [
        Item("engine weights", e.weights_bytes, ("rollout", "sync") if released else PHASES,
             f"sglang tp={e.tp}" + (", fp8" if cfg.rollout.sglang.fp8_weights else "")),
        Item("engine KV cache", max(e.kv_bytes, 0.0), ("rollout",) if released else PHASES,
             f"mem_fraction_static={cfg.rollout.sglang.mem_fraction_static} x free at start minus engine weights"),
        Item("engine request table", request_table_bytes(e), ("rollout",) if released else PHASES,
             f"ReqToTokenPool int32 [reqs, {e.context_len} + 4], outside the static pool"),
        Item("engine residue", hw.engine_residue_gb * GiB, PHASES,
             "context, NCCL, workspaces: not freed by release (estimate)"),
        buckets,
    ]
