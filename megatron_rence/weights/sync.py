"""Per-step transport: walk the live sharded model and stream buckets of full HF-named tensors to the engine.

Every rank that feeds an engine (`dst_ranks`) gets each full tensor through collectives among ranks that
already hold its pieces, in every data/context replica at once (weights/routes.py has the routes)::

    bucket of tensors (plan order) --owner stage: pack this TP rank's pieces (one uint8 buffer per owner)
        --rounds of batched isend/irecv: the pack hops to TP rank t of the next stage of the chain
          (pipeline peers; "some" ranks get every TP rank's pack directly)
        --per tensor: TP all-gather of the pieces (async, all of the bucket in flight), merge
          (fc1 [gate_i; up_i] re-chunk, replicated pieces un-padded) --> HF names (mapping.to_hf)
        --(FP8: quantised tensor by tensor) --> the bucket is yielded on engine-feeding ranks

A bucket is dropped by the caller after `engine.update_weights`, so the extra memory per rank is about
one bucket (its full tensors) plus the owner's or relay's pack (bucket / TP). With `overlap` (the default,
weights.overlap_gather) the exchange and TP all-gathers of bucket i + 1 are started before bucket i is
handed to the engine: on GPU they run on NCCL's streams (on CPU, gloo's threads) while the engine loads
bucket i, for one more bucket of gather buffers. Every rank issues the same collectives in the same order
either way, and the tensors are the same bits. Each rank counts the bytes it
sends and receives (`routes.ByteCount`; intra- vs inter-node from `gpus_per_node`, default the
LOCAL_WORLD_SIZE environment variable of torchrun / the Slurm launch scripts).
"""
from __future__ import annotations

import os
import time
import weakref
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_rence.weights.mapping import dims_of, get_mapping
from megatron_rence.weights.plan import TensorPlan, build_plan, make_buckets, merge_tp_shards, unwrap
from megatron_rence.weights.quantize import quantize_bucket
from megatron_rence.weights.routes import ByteCount, Grid, Routes, piece_numel

_ALIGN = 64  # bytes: every piece starts aligned inside a pack, so uint8 slices view as any dtype

# first chunk -> (key, plan, grid); weak, so a model built after another was freed (and given its id) gets
# its own plan: a stale hit would skip build_plan's collective on that rank only and deadlock the others.
_PLAN_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _grid(pstate) -> Grid:
    """Every rank's (dp, cp, pp, tp) coordinates, gathered from the live layout (collective)."""
    mine = (pstate.rank, (pstate.dp_rank, pstate.cp_rank, pstate.pp_rank, pstate.tp_rank))
    gathered: list = [mine]
    if dist.is_initialized() and pstate.world_size > 1:
        gathered = [None] * pstate.world_size
        dist.all_gather_object(gathered, mine)
    return Grid.from_coords(gathered, pstate.tp_size, pstate.pp_size, pstate.dp_size, pstate.cp_size)


def _plan(model_chunks, pstate, tied: bool) -> tuple[list[TensorPlan], Grid]:
    key = (tuple(id(c) for c in model_chunks), pstate.rank, pstate.world_size, tied)
    cached = _PLAN_CACHE.get(model_chunks[0])
    if cached is None or cached[0] != key:
        cached = (key, build_plan(model_chunks, pstate, tied), _grid(pstate))
        _PLAN_CACHE[model_chunks[0]] = cached
    return cached[1], cached[2]


def default_gpus_per_node() -> Optional[int]:
    """LOCAL_WORLD_SIZE (torchrun, slurm/rence.sbatch), else unknown."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value else None


def _layout(plans: list[TensorPlan], tp: int, same_stage: bool) -> tuple[dict[str, tuple[int, int]], int]:
    """{name: (byte offset, piece elements)} of one TP rank's pieces in a pack, and the pack's bytes.

    `same_stage`: only the TP-split tensors (the receiver is on the owner stage and has the others)."""
    offsets, offset = {}, 0
    for plan in plans:
        if same_stage and plan.tp_dim is None:
            continue
        numel = piece_numel(_numel(plan.full_shape), tp, plan.tp_dim is not None)
        offsets[plan.name] = (offset, numel)
        offset += -(-numel * plan.dtype.itemsize // _ALIGN) * _ALIGN
    return offsets, offset


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _assemble(plan: TensorPlan, flat: torch.Tensor, tp: int) -> torch.Tensor:
    """The full tensor from its TP pieces laid end to end in TP-rank order (`flat`, 1-D, tp x piece)."""
    if plan.tp_dim is None or tp == 1:  # one piece is the whole tensor ([gate; up] already for fc1)
        return flat[:_numel(plan.full_shape)].view(plan.full_shape)
    if plan.tp_dim == 0 and not plan.fused_gate_up:
        return flat.view(plan.full_shape)  # row shards end to end are the full tensor: no copy
    return merge_tp_shards([s.view(plan.local_shape) for s in flat.chunk(tp)], plan)


class Transport:
    """One rank's side of the sync for a model, its routes and a byte counter."""

    def __init__(self, model_chunks, pstate, routes: Routes, count: ByteCount, gpus_per_node: Optional[int]):
        self.chunks, self.pstate, self.routes, self.count = model_chunks, pstate, routes, count
        self.gpus_per_node = gpus_per_node
        self.me = pstate.rank
        self.replica = (pstate.dp_rank, pstate.cp_rank)
        self.stage, self.t, self.tp = pstate.pp_rank, pstate.tp_rank, pstate.tp_size
        self.strategy = routes.strategy(self.replica, self.stage)
        self.feeds = self.me in routes.dst_ranks
        self._params: dict[int, dict] = {}

    def _param(self, plan: TensorPlan) -> torch.Tensor:
        if plan.chunk not in self._params:
            self._params[plan.chunk] = dict(unwrap(self.chunks[plan.chunk]).named_parameters())
        return self._params[plan.chunk][plan.local_name].detach()

    def _local_piece(self, plan: TensorPlan) -> torch.Tensor:
        """This TP rank's piece (1-D, piece_numel elements): its shard, or slice t of a replicated tensor."""
        flat = self._param(plan).reshape(-1)
        if plan.tp_dim is not None:
            return flat
        m = piece_numel(flat.numel(), self.tp, False)
        piece = flat[self.t * m:(self.t + 1) * m]
        if piece.numel() < m:
            piece = torch.cat([piece, piece.new_zeros(m - piece.numel())])
        return piece

    def _pack(self, plans: list[TensorPlan], same_stage: bool) -> torch.Tensor:
        offsets, size = _layout(plans, self.tp, same_stage)
        pack = torch.empty(size, dtype=torch.uint8, device=self.pstate.device)
        for plan in plans:
            if plan.name in offsets:
                offset, numel = offsets[plan.name]
                pack[offset:offset + numel * plan.dtype.itemsize].view(plan.dtype).copy_(self._local_piece(plan))
        return pack

    def exchange(self, by_owner: dict[int, list[TensorPlan]]) -> dict[tuple[int, int], torch.Tensor]:
        """Run the pack rounds of one bucket; returns {(owner stage, source TP rank): received pack}."""
        held: dict[tuple[int, int], torch.Tensor] = {}
        built: dict[tuple[int, bool], torch.Tensor] = {}
        num_rounds = max(len(self.routes.rounds(o)) for o in by_owner)
        for k in range(num_rounds):
            ops = []
            for owner, plans in by_owner.items():
                rounds = self.routes.rounds(owner)
                for hop in rounds[k] if k < len(rounds) else ():
                    if hop.src == self.me:
                        if self.stage == owner:
                            if (owner, hop.same_stage) not in built:
                                built[(owner, hop.same_stage)] = self._pack(plans, hop.same_stage)
                            buf = built[(owner, hop.same_stage)]
                        else:  # a relay forwards the pack it received in the previous round
                            buf = held[(owner, self.t)]
                        ops.append(dist.P2POp(dist.isend, buf, hop.dst))
                        self.count.messages += 1
                        self.count.add(self.me, hop.dst, buf.numel(), True, self.gpus_per_node)
                    elif hop.dst == self.me:
                        buf = torch.empty(_layout(plans, self.tp, hop.same_stage)[1], dtype=torch.uint8,
                                          device=self.pstate.device)
                        held[(owner, self.routes.grid.coord(hop.src)[3])] = buf
                        ops.append(dist.P2POp(dist.irecv, buf, hop.src))
                        self.count.add(self.me, hop.src, buf.numel(), False, self.gpus_per_node)
            if ops:
                for request in dist.batch_isend_irecv(ops):
                    request.wait()
        return held

    def _received_piece(self, held, offsets, plan: TensorPlan, source_t: int) -> torch.Tensor:
        """Piece `source_t` of `plan` from a received pack (laid out by `_layout` for its owner's tensors)."""
        offset, numel = offsets[(plan.pp_rank, plan.pp_rank == self.stage)][plan.name]
        return held[(plan.pp_rank, source_t)][offset:offset + numel * plan.dtype.itemsize].view(plan.dtype)

    def start(self, bucket: list[TensorPlan]) -> list:
        """Run the bucket's pack rounds and put every TP all-gather of it in flight (collective on every
        rank); returns the pending (plan, (kind, value, work)) that `full_tensors` finishes."""
        by_owner: dict[int, list[TensorPlan]] = {}
        for plan in bucket:
            by_owner.setdefault(plan.pp_rank, []).append(plan)
        held = self.exchange(by_owner)
        if self.strategy == "none" or (self.strategy == "some" and not self.feeds):
            return []
        offsets = {(owner, same): _layout(plans, self.tp, same)[0]
                   for owner, plans in by_owner.items() for same in (False, True)}
        return [(plan, self._start(plan, held, offsets)) for plan in bucket]

    def full_tensors(self, pending: list) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        """(plan, full tensor) for each tensor of a bucket `start`ed, on engine-feeding ranks (and TP
        all-gathers on every rank of an "all" stage)."""
        for i, (plan, (kind, value, work)) in enumerate(pending):
            pending[i] = None  # the gathered buffer lives no longer than its full tensor
            if work is not None:
                work.wait()
            yield plan, value if kind == "full" else _assemble(plan, value, self.tp)
            del value, work

    def _start(self, plan: TensorPlan, held, offsets):
        """('full', tensor, None) when no gather is needed, else ('flat', tp x piece buffer, async work or None)."""
        own = plan.pp_rank == self.stage
        if own and (plan.tp_dim is None or self.tp == 1):  # this rank holds the full tensor
            return "full", self._param(plan), None
        if self.strategy == "some":
            pieces = [self._local_piece(plan) if own and t == self.t
                      else self._received_piece(held, offsets, plan, t) for t in range(self.tp)]
            return "flat", torch.cat(pieces), None
        piece = self._local_piece(plan) if own else self._received_piece(held, offsets, plan, self.t)
        if self.tp == 1:
            return "flat", piece, None
        flat = torch.empty(piece.numel() * self.tp, dtype=plan.dtype, device=piece.device)
        work = dist.all_gather(list(flat.chunk(self.tp)), piece.contiguous(), group=self.pstate.tp_group,
                               async_op=True)
        nbytes = (self.tp - 1) * piece.numel() * plan.dtype.itemsize
        nxt, prev = self.routes.ring_peers(self.me)
        self.count.add(self.me, nxt, nbytes, True, self.gpus_per_node)  # ring all-gather: tp-1 pieces each way
        self.count.add(self.me, prev, nbytes, False, self.gpus_per_node)
        self.count.collectives += 1
        return "flat", flat, work


def iter_hf_buckets(model_chunks: list, model_cfg, vocab_size: int, bucket_bytes: int, pstate,
                    dst_ranks: Sequence[int] = (0,), count: Optional[ByteCount] = None,
                    gpus_per_node: Optional[int] = None, fp8: bool = False,
                    overlap: bool = True) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of (HF name, full tensor); yields only on `dst_ranks`, but every rank must run it to the end.

    `count` (optional) accumulates this rank's bytes sent and received; `fp8` quantises each linear weight
    to block FP8 as soon as its full tensor is built (weights/quantize.py); `overlap` starts the collectives
    of the next bucket before yielding one (module docstring)."""
    mapping = get_mapping(model_cfg.arch)  # to_hf reads TE-fused and local norm names alike
    dims = dims_of(model_cfg, vocab_size)
    plans, grid = _plan(model_chunks, pstate, model_cfg.tie_word_embeddings)
    routes = Routes(grid, frozenset(dst_ranks))
    transport = Transport(model_chunks, pstate, routes, count if count is not None else ByteCount(), gpus_per_node)
    buckets = make_buckets(plans, bucket_bytes)
    pending = transport.start(buckets[0]) if buckets else []
    for i in range(len(buckets)):
        out: list[tuple[str, torch.Tensor]] = []
        for plan, full in transport.full_tensors(pending):
            if transport.feeds:
                hf = mapping.to_hf(plan.name, full, dims)
                out.extend(quantize_bucket(hf) if fp8 else hf)
            del full
        last = i + 1 == len(buckets)
        pending = transport.start(buckets[i + 1]) if overlap and not last else []
        if transport.feeds:
            yield out
        del out
        if not overlap and not last:
            pending = transport.start(buckets[i + 1])


def _max_over_ranks(values: list[float], pstate) -> list[float]:
    if not (dist.is_initialized() and pstate.world_size > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=pstate.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def push_weights(model_chunks: list, model_cfg, vocab_size: int, engine, version: int, bucket_bytes: int,
                 pstate, dst_ranks: Sequence[int] = (0,), fp8: bool = False,
                 gpus_per_node: Optional[int] = None, overlap: bool = True) -> dict[str, float]:
    """Stream the trainer's weights into `engine` (on `dst_ranks`; None elsewhere) as weight `version`.

    `fp8`: linear weights are quantised to block FP8 on the destination rank (weights/quantize.py) before
    the engine loads them; `sync/bytes` counts what this rank's engine received. `sync/sent_bytes`,
    `sync/recv_bytes` (and their `_inter` parts, peers on another node) count this rank's transport;
    `sync/max_rank_sent_bytes` / `sync/max_rank_recv_bytes` the busiest rank's (a small all-reduce).
    """
    gpus_per_node = gpus_per_node if gpus_per_node is not None else default_gpus_per_node()
    t0 = time.perf_counter()
    count = ByteCount()
    num_bytes = num_buckets = 0
    for bucket in iter_hf_buckets(model_chunks, model_cfg, vocab_size, bucket_bytes, pstate, dst_ranks,
                                  count=count, gpus_per_node=gpus_per_node, fp8=fp8, overlap=overlap):
        num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
        num_buckets += 1
        if engine is not None:
            engine.update_weights(bucket, version)
        del bucket
    seconds = time.perf_counter() - t0
    max_sent, max_recv = _max_over_ranks([float(count.sent), float(count.received)], pstate)
    return {"perf/sync_s": seconds, "sync/bytes": float(num_bytes), "sync/buckets": float(num_buckets),
            "perf/sync_gbps": num_bytes / max(seconds, 1e-9) / 1e9,
            "sync/sent_bytes": float(count.sent), "sync/recv_bytes": float(count.received),
            "sync/sent_inter_bytes": float(count.sent_inter), "sync/recv_inter_bytes": float(count.recv_inter),
            "sync/messages": float(count.messages), "sync/allgathers": float(count.collectives),
            "sync/max_rank_sent_bytes": max_sent, "sync/max_rank_recv_bytes": max_recv}
