"""Sync planning: which rank owns each parameter shard, how shards merge into full tensors, and buckets.

The plan is built once per model layout from every rank's parameter metadata and is identical on all
ranks, so every rank walks the same tensors in the same order (the transport's collectives line up).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorPlan:
    """One Megatron parameter: its global name, where it lives, and how its TP shards merge."""

    name: str  # global layer index, e.g. decoder.layers.17.mlp.linear_fc1.weight
    chunk: int  # virtual pipeline chunk on the owning stage
    local_name: str  # name inside that chunk (local layer index)
    pp_rank: int
    src_rank: int  # global rank holding the TP-rank-0 shard in data/context-parallel replica 0
    local_shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    tp_dim: Optional[int]  # None: replicated across TP
    fused_gate_up: bool  # linear_fc1: each TP shard is [gate_i; up_i]

    @property
    def full_bytes(self) -> int:
        numel = 1
        for d in self.full_shape:
            numel *= d
        return numel * self.dtype.itemsize


def global_name(chunk_module, local_name: str) -> str:
    """Replace the chunk-local layer index with the global one (megatron's 1-based `layer_number`)."""
    match = _LOCAL_LAYER.match(local_name)
    if match is None:
        return local_name
    local, suffix = int(match.group(1)), match.group(2)
    layer = chunk_module.decoder.layers[local]
    return f"decoder.layers.{layer.layer_number - 1}.{suffix}"


def unwrap(module):
    while hasattr(module, "module") and not hasattr(module, "decoder"):  # DDP / Float16Module wrappers
        module = module.module
    return module


def local_entries(model_chunks: list, pstate, tied: bool) -> list[dict]:
    """This rank's parameters as plain metadata (picklable)."""
    entries = []
    for chunk_index, chunk in enumerate(model_chunks):
        module = unwrap(chunk)
        for local_name, param in module.named_parameters():
            if tied and local_name == "output_layer.weight":
                continue  # the copy of the embedding on the last stage
            tp_dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            full = list(param.shape)
            if tp_dim is not None:
                full[tp_dim] *= pstate.tp_size
            entries.append(dict(name=global_name(module, local_name), chunk=chunk_index, local_name=local_name,
                                pp_rank=pstate.pp_rank, local_shape=tuple(param.shape), full_shape=tuple(full),
                                dtype=param.dtype, tp_dim=tp_dim, fused_gate_up=local_name.endswith("linear_fc1.weight")))
    return entries


def build_plan(model_chunks: list, pstate, tied: bool) -> list[TensorPlan]:
    """The global plan: every parameter once, ordered by pipeline stage, chunk and parameter order."""
    mine = local_entries(model_chunks, pstate, tied) if (pstate.tp_rank == 0 and pstate.dp_rank == 0
                                                          and pstate.cp_rank == 0) else []
    gathered: list = [None] * pstate.world_size
    payload = (pstate.rank, mine)
    if dist.is_initialized() and pstate.world_size > 1:
        dist.all_gather_object(gathered, payload)
    else:
        gathered = [payload]
    plans = []
    seen = set()
    for rank, entries in sorted(gathered, key=lambda item: (item[1][0]["pp_rank"] if item[1] else -1, item[0])):
        for e in entries:
            assert e["name"] not in seen, f"parameter {e['name']} owned twice"
            seen.add(e["name"])
            plans.append(TensorPlan(src_rank=rank, **e))
    return plans


def make_buckets(plans: list[TensorPlan], bucket_bytes: int) -> list[list[TensorPlan]]:
    """Consecutive tensors grouped into buckets of at most `bucket_bytes` full-size bytes.

    A tensor larger than a bucket travels alone.
    """
    if bucket_bytes < 1:
        raise ValueError(f"weights.bucket_bytes: must be >= 1, got {bucket_bytes}")
    buckets: list[list[TensorPlan]] = []
    current: list[TensorPlan] = []
    size = 0
    for plan in plans:
        if current and size + plan.full_bytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(plan)
        size += plan.full_bytes
    if current:
        buckets.append(current)
    return buckets


def merge_tp_shards(shards: list[torch.Tensor], plan: TensorPlan) -> torch.Tensor:
    """TP shards (in TP-rank order) -> the full tensor; fc1 shards `[gate_i; up_i]` re-chunk to `[gate; up]`."""
    if plan.tp_dim is None:
        return shards[0]
    if plan.fused_gate_up:
        halves = [s.chunk(2, dim=plan.tp_dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=plan.tp_dim)
    return torch.cat(shards, dim=plan.tp_dim)


def split_tp_shards(full: torch.Tensor, plan_tp_dim: Optional[int], fused_gate_up: bool, tp: int) -> list[torch.Tensor]:
    """Inverse of `merge_tp_shards`: the TP shards of a full Megatron tensor."""
    if plan_tp_dim is None:
        return [full] * tp
    if fused_gate_up:
        gate, up = full.chunk(2, dim=plan_tp_dim)
        return [torch.cat([g, u], dim=plan_tp_dim)
                for g, u in zip(gate.chunk(tp, dim=plan_tp_dim), up.chunk(tp, dim=plan_tp_dim))]
    return list(full.chunk(tp, dim=plan_tp_dim))
