"""Per-step transport: walk the live sharded model and stream buckets of full HF-named tensors to the engine.

For each planned tensor the owning stage's TP group all-gathers its shards (data/context replica 0
only), the TP-rank-0 holder merges them and sends the full tensor point-to-point to each engine-feeding
rank, which maps it to HF names. A bucket is yielded as soon as it is complete and dropped by the
caller after `engine.update_weights`, so the extra memory is about one bucket.
"""
from __future__ import annotations

import time
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rence.weights.mapping import dims_of, get_mapping
from megatron_rence.weights.plan import TensorPlan, build_plan, make_buckets, merge_tp_shards, unwrap
from megatron_rence.weights.quantize import quantize_bucket

# first chunk -> (key, plan); weak, so a model built after another was freed (and given its id) gets its
# own plan: a stale hit would skip build_plan's collective on that rank only and deadlock the others.
_PLAN_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _plan(model_chunks, pstate, tied: bool) -> list[TensorPlan]:
    key = (tuple(id(c) for c in model_chunks), pstate.rank, pstate.world_size, tied)
    cached = _PLAN_CACHE.get(model_chunks[0])
    if cached is None or cached[0] != key:
        cached = (key, build_plan(model_chunks, pstate, tied))
        _PLAN_CACHE[model_chunks[0]] = cached
    return cached[1]


def _param(model_chunks, plan: TensorPlan) -> torch.Tensor:
    return dict(unwrap(model_chunks[plan.chunk]).named_parameters())[plan.local_name]


def _full_tensor(model_chunks, plan: TensorPlan, pstate) -> Optional[torch.Tensor]:
    """The full tensor on `plan.src_rank`; None elsewhere. TP ranks of the owning replica take part."""
    in_owner_replica = pstate.pp_rank == plan.pp_rank and pstate.dp_rank == 0 and pstate.cp_rank == 0
    if not in_owner_replica:
        return None
    local = _param(model_chunks, plan).detach()
    if plan.tp_dim is not None and pstate.tp_size > 1:
        shards = [torch.empty_like(local) for _ in range(pstate.tp_size)]
        dist.all_gather(shards, local.contiguous(), group=pstate.tp_group)
        return merge_tp_shards(shards, plan) if pstate.rank == plan.src_rank else None
    return local if pstate.rank == plan.src_rank else None


def _deliver(full: Optional[torch.Tensor], plan: TensorPlan, pstate, dst_ranks: Sequence[int]) -> Optional[torch.Tensor]:
    """Point-to-point from the source rank to every destination rank; the tensor on destinations."""
    if pstate.rank == plan.src_rank:
        for dst in dst_ranks:
            if dst != plan.src_rank:
                dist.send(full.contiguous(), dst)
        return full if pstate.rank in dst_ranks else None
    if pstate.rank in dst_ranks:
        buf = torch.empty(plan.full_shape, dtype=plan.dtype, device=pstate.device)
        dist.recv(buf, plan.src_rank)
        return buf
    return None


def iter_hf_buckets(model_chunks: list, model_cfg, vocab_size: int, bucket_bytes: int, pstate,
                    dst_ranks: Sequence[int] = (0,)) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (HF name, full tensor); yields only on `dst_ranks`, but every rank must run it to the end."""
    mapping = get_mapping(model_cfg.arch)  # to_hf reads TE-fused and local norm names alike
    dims = dims_of(model_cfg, vocab_size)
    plans = _plan(model_chunks, pstate, model_cfg.tie_word_embeddings)
    for bucket in make_buckets(plans, bucket_bytes):
        out: list[tuple[str, torch.Tensor]] = []
        for plan in bucket:
            full = _deliver(_full_tensor(model_chunks, plan, pstate), plan, pstate, dst_ranks)
            if full is not None:
                out.extend(mapping.to_hf(plan.name, full, dims))
        if pstate.rank in dst_ranks:
            yield out


def push_weights(model_chunks: list, model_cfg, vocab_size: int, engine, version: int, bucket_bytes: int,
                 pstate, dst_ranks: Sequence[int] = (0,), fp8: bool = False) -> dict[str, float]:
    """Stream the trainer's weights into `engine` (on `dst_ranks`; None elsewhere) as weight `version`.

    `fp8`: each bucket's linear weights are quantised to block FP8 on the destination rank
    (weights/quantize.py) before the engine loads them; `sync/bytes` counts what the engine received.
    """
    t0 = time.perf_counter()
    num_bytes = 0
    num_buckets = 0
    for bucket in iter_hf_buckets(model_chunks, model_cfg, vocab_size, bucket_bytes, pstate, dst_ranks):
        if fp8:
            bucket = quantize_bucket(bucket)
        num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        num_buckets += 1
        if engine is not None:
            engine.update_weights(bucket, version)
        del bucket
    seconds = time.perf_counter() - t0
    return {"perf/sync_s": seconds, "sync/bytes": float(num_bytes), "sync/buckets": float(num_buckets),
            "perf/sync_gbps": num_bytes / max(seconds, 1e-9) / 1e9}
