"""The whole weight-sync phase of a colocated step, term by term (`rence-plan --json`: ``sync.phase_estimate_s``).

``planning/sync_cost.py`` counts the bytes each rank moves (tied to the transport by a gloo test); this
module adds everything else a step pays between the optimizer step and the next rollout, in the order of
train.py (``sync_weights`` and the hand-off of megatron/offload.py), for the slowest GPU::

    trainer_offload   optimizer state -> reusable pinned host buffers (megatron/offload.py; megatron's own
                      offload_to_cpu copies to pageable memory), and the parameters with
                      train.offload_params (megatron's buffer ``.cpu().pin_memory()``: a pageable copy); 0 with
                      train.offload_optimizer=false. Gradient buffers are freed, not copied.
    engine_resume     torch_memory_saver maps the engine's weights and KV cache back (an assumption: no
                      published figure; SGLang does not run on the lent GPUs)
    transfers         sync_cost's busiest rank: intra-node bytes at the all-gather's bus bandwidth
                      (nccl-tests busbw: a ring rank receives (n-1)/n of the output, busbw = that / time),
                      inter-node bytes at the NIC's measured rate
    bucket_overhead   per bucket handed to the engine (one per dtype of a bucket: flattened buckets are
                      single-dtype): gather of the IPC handles, ZMQ message, the scheduler's and TP workers'
                      Python (FlattenedTensorBucket rebuild, load_weights loop, barriers). The fixed cost
                      measured on SGLang's real code on CPU (benchmarks/bench_sglang_update.py); a floor
                      for the GPU's, which adds cudaIpcOpenMemHandle and CUDA synchronisation
    trainer_copies    our side on the GPU: merging TP pieces (fc1 re-chunk, row-parallel concat, QKV split:
                      every layer weight is copied once; embedding / output are views) and flattening the
                      bucket into one buffer (every byte once), at the HBM copy rate
    fp8_quantise      block FP8 of the linear weights: measured on CPU as a multiple of one copy of the same
                      bytes (bench_sglang_update.py), applied at the HBM copy rate
    engine_load       each engine GPU copies its shard of every tensor into its parameters (load_weights'
                      weight loaders narrow the full tensor), at the HBM copy rate
    overlap           with weights.overlap_gather (weights/sync.py) the all-gathers of bucket i + 1 run while
                      bucket i is flattened and loaded: per bucket max(gather, consume) instead of the sum
    engine_release    the engine releases weights and KV cache after rollout (same assumption as resume)
    trainer_restore   optimizer state back (host -> GPU), gradient buffers reallocated and zeroed

Rates (H100 SXM defaults, each a flag of rence-plan; sources in docs/performance.md):
  all-gather bus bandwidth 340 GB/s   nccl-tests all_gather_perf on 8 x H100 (NVIDIA/nccl#1218); the
                                      NVLink 4 peak is 450 GB/s each way
  inter-node 46 GB/s per GPU          NDR 400 Gb/s: 46-48 GB/s per NIC in nccl-tests (NVIDIA/nccl-tests#290)
  host pinned 52.8 / 35.2 GB/s        nvbandwidth device_to_host / host_to_device memcpy on H100
                                      (NVIDIA/nvbandwidth#24)
  host pageable 10 GB/s               an assumption (a pageable copy is staged through a pinned buffer by a
                                      CPU memcpy); only train.offload_params' parameters take that path
  HBM copy 1,675 GB/s                 H100 SXM HBM3 3.35 TB/s (datasheet) / 2: a copy reads and writes
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rence.config import Config
from megatron_rence.planning.params import stage_params
from megatron_rence.planning.sync_cost import DTYPE_BYTES, SyncCost, SyncTensor

# benchmarks/bench_sglang_update.py on SGLang 0.5.5.post3's real engine, CPU, 2 shared cores (docs/performance.md):
# one update_weights call = 36.1 ms + 40.5 ms per MB (least squares over 2 KB - 63 MB buckets, run A; run B
# minutes later at a similar load: 7.5 ms + 7.6 ms/MB). The larger intercept is taken: the CPU figure is a
# floor for a GPU's fixed cost (which adds CUDA IPC handles), and slime's published engine-side cost on H200
# is ~22 ms per chunk.
BUCKET_FIXED_S = 0.036
FP8_COPIES = 19.4  # block FP8 quantisation of a 4096 x 4096 bf16 weight = 19.4 copy_ of its bytes (same run)


@dataclass(frozen=True)
class PhaseRates:
    host_pinned_d2h_gbps: float = 52.8
    host_pinned_h2d_gbps: float = 35.2
    host_pageable_gbps: float = 10.0
    hbm_copy_gbps: float = 1675.0
    bucket_fixed_s: float = BUCKET_FIXED_S
    fp8_copies: float = FP8_COPIES
    engine_resume_s: float = 0.25  # assumption (see the module docstring)
    engine_release_s: float = 0.25  # assumption


@dataclass
class PhaseCost:
    terms: dict[str, float]  # seconds per term, phase order; "overlap_saved" is negative
    buckets: int
    engine_calls: int  # flattened buckets handed to each engine
    offload_bytes: float  # per GPU, each way
    basis: dict[str, str]

    @property
    def phase_estimate_s(self) -> float:
        return sum(self.terms.values())

    def to_json(self) -> dict:
        return {"phase_estimate_s": self.phase_estimate_s, "phase_terms_s": dict(self.terms),
                "buckets": self.buckets, "engine_calls": self.engine_calls,
                "offload_gb": self.offload_bytes / 1e9, "phase_basis": dict(self.basis)}


def bucket_sizes(tensors: list[SyncTensor], itemsize: int, bucket_bytes: int) -> list[list[SyncTensor]]:
    """weights.plan.make_buckets on the cost model's tensors (plan order: embedding, layers, final norm, output)."""
    buckets, current, size = [], [], 0
    for t in tensors:
        nbytes = t.numel * itemsize
        if current and size + nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _is_linear(t: SyncTensor) -> bool:
    return t.tp_split and t.name.startswith("layers.") and not t.name.endswith(".bias")


def _offload_bytes(cfg: Config, params_per_gpu: int, dp: int) -> tuple[float, float]:
    """Bytes per GPU the hand-off copies to the host each way: (optimizer state into pinned buffers,
    parameters with train.offload_params through megatron's pageable buffer.offload_to_cpu)."""
    p, itemsize = cfg.parallel, DTYPE_BYTES[cfg.model.dtype]
    opt = 0.0
    if cfg.train.offload_optimizer:
        opt = params_per_gpu * (8 if itemsize == 4 else 12) / (dp * p.cp if p.distributed_optimizer else 1)
    return opt, (params_per_gpu * itemsize if cfg.train.offload_params else 0.0)


def phase_cost(cfg: Config, vocab_size: int, sync: SyncCost, tensors: list[SyncTensor], params_per_gpu: int,
               dp: int, rates: PhaseRates = PhaseRates()) -> PhaseCost:
    """The seconds of one weight-sync phase of `cfg`, term by term (module docstring); `sync` has the bytes."""
    m, w = cfg.model, cfg.weights
    itemsize = DTYPE_BYTES[m.dtype]
    fp8 = cfg.rollout.engine == "sglang" and cfg.rollout.sglang.fp8_weights
    engine_tp = cfg.rollout.sglang.tp if cfg.rollout.engine == "sglang" else 1
    copy = rates.hbm_copy_gbps * 1e9
    buckets = bucket_sizes(tensors, itemsize, w.bucket_bytes)
    total = sum(t.numel for t in tensors) * itemsize
    gather_each, consume_each, calls = [], [], 0
    for bucket in buckets:
        nbytes = sum(t.numel for t in bucket) * itemsize
        linear = sum(t.numel for t in bucket if _is_linear(t)) * itemsize
        merged = linear if cfg.parallel.tp > 1 else 0  # TP pieces of layer weights are merged by a copy
        dtypes = {itemsize} if any(not (fp8 and _is_linear(t)) for t in bucket) else set()
        if fp8 and linear:
            dtypes |= {1, 4}  # float8 weights, float32 scale_inv
        calls += len(dtypes)
        engine_bytes = nbytes - (linear * (itemsize - 1) / itemsize if fp8 else 0)
        gather_each.append((sync.transfer_s + sync.latency_s) * nbytes / total)
        consume_each.append({"bucket_overhead": len(dtypes) * rates.bucket_fixed_s,
                             "trainer_copies": (merged + engine_bytes) / copy,
                             "fp8_quantise": rates.fp8_copies * linear / copy if fp8 else 0.0,
                             "engine_load": engine_bytes / engine_tp / copy})
    opt, params = _offload_bytes(cfg, params_per_gpu, dp)
    offload, page = opt + params, rates.host_pageable_gbps * 1e9
    down = opt / (rates.host_pinned_d2h_gbps * 1e9) + params / page
    up = opt / (rates.host_pinned_h2d_gbps * 1e9) + params / page
    grad_bytes = params_per_gpu * 4  # fp32 main-grad buffer, reallocated and zeroed
    terms = {"trainer_offload": down, "engine_resume": rates.engine_resume_s,
             "transfers": sync.transfer_s + sync.latency_s}
    for key in ("bucket_overhead", "trainer_copies", "fp8_quantise", "engine_load"):
        terms[key] = sum(c[key] for c in consume_each)
    consume = [sum(c.values()) for c in consume_each]
    serial = sum(gather_each) + sum(consume)
    if w.overlap_gather and buckets:  # gather of bucket i + 1 under the consumption of bucket i
        piped = gather_each[0] + sum(max(g, c) for g, c in zip(gather_each[1:], consume[:-1])) + consume[-1]
        terms["overlap_saved"] = piped - serial
    else:
        terms["overlap_saved"] = 0.0
    terms["engine_release"] = rates.engine_release_s
    terms["trainer_restore"] = up + grad_bytes / (2 * copy)  # zeroing writes once
    basis = {"trainer_offload": f"optimizer {opt / 1e9:.1f} GB per GPU to pinned buffers at "
                                f"{rates.host_pinned_d2h_gbps:g} GB/s (nvbandwidth, H100); parameters "
                                f"{params / 1e9:.1f} GB at {rates.host_pageable_gbps:g} GB/s pageable (assumed)",
             "engine_resume": "assumption (torch_memory_saver; unmeasured)",
             "transfers": "sync_cost: busiest rank at the all-gather bus bandwidth + inter-node NIC rate",
             "bucket_overhead": f"{calls} engine calls x {rates.bucket_fixed_s * 1e3:.1f} ms "
                                "(bench_sglang_update.py, CPU floor)",
             "trainer_copies": f"merge + flatten at {rates.hbm_copy_gbps:g} GB/s (HBM3 / 2)",
             "fp8_quantise": f"{rates.fp8_copies:g} copies of the linear bytes (bench_sglang_update.py)",
             "engine_load": f"shard of every tensor per engine GPU (tp={engine_tp}) at the HBM copy rate",
             "overlap_saved": "weights.overlap_gather: per bucket max(gather, consume)",
             "engine_release": "assumption (torch_memory_saver; unmeasured)",
             "trainer_restore": f"optimizer at {rates.host_pinned_h2d_gbps:g} GB/s pinned, parameters at "
                                f"{rates.host_pageable_gbps:g} GB/s + zeroing the fp32 grad buffer"}
    return PhaseCost(terms, len(buckets), calls, offload, basis)


def params_per_gpu(cfg: Config, vocab_size: int) -> int:
    """The most parameters one trainer GPU holds (its pipeline stage's share over TP), for the hand-off bytes."""
    return max(s.params for s in stage_params(cfg.model, cfg.parallel, vocab_size))
