"""Weight-sync cost model: every rank's bytes sent and received per sync, and the estimated sync seconds.

The bytes follow the transport of ``weights/sync.py`` exactly (the gloo test compares them, rank by rank):
the same routes (``weights/routes.py``) applied to the recipe's Megatron tensor shapes instead of a live
model. Per tensor of pipeline stage ``o`` with TP piece ``b`` bytes (its TP shard; a TP-replicated tensor
is cut into ``ceil(numel / tp)``-element slices):

  pieces across stages   the pack of a stage's pieces hops o -> o+1 -> ... (each piece rounded up to 64
                         bytes in the pack); a rank sends and receives about stage bytes / TP
  TP all-gather          a ring: each rank sends (tp - 1) * b to the next TP rank and receives as much from
                         the previous one (replicated tensors on their own stage need none)

The seconds of the busiest rank (nothing overlapped, so an upper estimate of the transfers)::

    transfers   max(sent, received) intra-node / allgather_busbw_gbps + max(sent, received) inter-node / ib_gbps
    engine      engine_copies * bytes the engine loads / hbm_gbps (flatten into the bucket buffer, the
                engine's copy into its parameters)
    latency     latency_us * (TP all-gathers + message rounds, one round per bucket and pipeline hop)

H100 SXM defaults: intra-node traffic (the TP all-gather; the pipeline hops go between nodes) at the
all-gather's bus bandwidth measured by nccl-tests all_gather_perf on 8 x H100, 340 GB/s (NVIDIA/nccl#1218;
NVLink 4's peak is 450 GB/s each way): a ring rank receives (n - 1) / n of the output, and nccl-tests'
busbw is exactly that over the time. InfiniBand: one ConnectX-7 NDR 400 Gb/s NIC per GPU (DGX H100),
46-48 GB/s per NIC in nccl-tests (NVIDIA/nccl-tests#290): 46. A device copy at 1,675 GB/s (HBM3 3.35 TB/s
peak / 2: it reads and writes every byte). Latency 20 us per NCCL call. The whole phase around these
transfers (offload, per-bucket engine calls, engine load, FP8, restore) is ``planning/sync_phase.py``.
Rank r is on node r // gpus_per_node (Slurm's block distribution, slurm/rence.sbatch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from megatron_rence.config import Config, ModelConfig, ParallelConfig
from megatron_rence.planning.params import model_params, padded_vocab_size
from megatron_rence.weights.routes import ByteCount, Grid, Routes, piece_numel

if TYPE_CHECKING:
    from megatron_rence.planning.sync_phase import PhaseCost

ALIGN = 64  # bytes; weights/sync.py's pack alignment (a test keeps them equal)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class SyncTensor:
    """One Megatron parameter as the sync sees it."""

    name: str
    stage: int  # owning pipeline stage
    numel: int  # full (vocabulary padded) element count
    tp_split: bool


@dataclass(frozen=True)
class Bandwidth:
    allgather_busbw_gbps: float = 340.0  # nccl-tests all_gather_perf busbw, 8 x H100 (1e9 bytes/s)
    ib_gbps: float = 46.0  # per GPU, each direction
    hbm_gbps: float = 1675.0  # device copy
    latency_us: float = 20.0
    engine_copies: int = 2


def layer_stage(layer: int, m: ModelConfig, p: ParallelConfig) -> int:
    """The pipeline stage of a (0-based) layer: chunks of num_layers / (pp * vpp) layers, round robin."""
    per_chunk = m.num_layers // (p.pp * (p.vpp or 1))
    return (layer // per_chunk) % p.pp


def sync_tensors(m: ModelConfig, p: ParallelConfig, vocab_size: int) -> list[SyncTensor]:
    """Every tensor the sync moves: Megatron's parameters (padded vocabulary; a tied output layer once)."""
    h, d, f = m.hidden_size, m.head_dim, m.ffn_hidden_size
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tp)
    out = [SyncTensor("embedding", 0, padded * h, True)]
    for layer in range(m.num_layers):
        s = layer_stage(layer, m, p)
        parts = [("input_layernorm", h, False), ("linear_qkv", (q + 2 * kv) * h, True)]
        if m.add_qkv_bias:
            parts.append(("linear_qkv.bias", q + 2 * kv, True))
        if m.qk_layernorm:
            parts += [("q_layernorm", d, False), ("k_layernorm", d, False)]
        parts += [("linear_proj", q * h, True), ("pre_mlp_layernorm", h, False), ("linear_fc1", 2 * f * h, True),
                  ("linear_fc2", h * f, True)]
        out += [SyncTensor(f"layers.{layer}.{name}", s, n, split) for name, n, split in parts]
    out.append(SyncTensor("final_layernorm", p.pp - 1, h, False))
    if not m.tie_word_embeddings:
        out.append(SyncTensor("output_layer", p.pp - 1, padded * h, True))
    return out


def feed_ranks(cfg: Config, world_size: int) -> list[int]:
    """phases.engine_feed_ranks without importing torch: rank 0 for the CPU engine, every rank with SGLang
    (its engine groups cover the world; a unit test keeps the two equal)."""
    return [0] if cfg.rollout.engine == "hf" else list(range(world_size))


def rank_bytes(tensors: list[SyncTensor], grid: Grid, dst_ranks, itemsize: int,
               gpus_per_node: Optional[int]) -> list[ByteCount]:
    """Bytes per rank (index = global rank) of one sync; `messages` is left at 0 (it depends on buckets)."""
    routes = Routes(grid, frozenset(dst_ranks))
    counts = [ByteCount() for _ in range(grid.world_size)]
    tp = grid.tp
    cross: dict[int, int] = {}  # stage -> pack bytes of its pieces (every tensor)
    same: dict[int, int] = {}  # stage -> pack bytes of its TP-split pieces
    gather: dict[tuple[int, bool], list[int]] = {}  # (stage, replicated) -> [all-gather bytes per rank, calls]
    for t in tensors:
        piece = piece_numel(t.numel, tp, t.tp_split) * itemsize
        packed = -(-piece // ALIGN) * ALIGN
        cross[t.stage] = cross.get(t.stage, 0) + packed
        if t.tp_split:
            same[t.stage] = same.get(t.stage, 0) + packed
        acc = gather.setdefault((t.stage, not t.tp_split), [0, 0])
        acc[0] += (tp - 1) * piece
        acc[1] += 1
    for owner in cross:
        for hops in routes.rounds(owner):
            for hop in hops:
                nbytes = same.get(owner, 0) if hop.same_stage else cross[owner]
                counts[hop.src].add(hop.src, hop.dst, nbytes, True, gpus_per_node)
                counts[hop.dst].add(hop.dst, hop.src, nbytes, False, gpus_per_node)
    for rank in range(grid.world_size):
        nxt, prev = routes.ring_peers(rank)
        for (owner, replicated), (nbytes, calls) in gather.items():
            if routes.gathers(rank, owner, replicated):
                counts[rank].add(rank, nxt, nbytes, True, gpus_per_node)
                counts[rank].add(rank, prev, nbytes, False, gpus_per_node)
                counts[rank].collectives += calls
    return counts


@dataclass
class SyncCost:
    counts: list[ByteCount]
    engine_bytes: float  # what one engine-feeding rank hands its engine per sync
    model_bytes: float  # the HF model in the training dtype
    transfer_s: float
    engine_s: float
    latency_s: float
    busiest_rank: int
    phase: Optional["PhaseCost"] = None  # the whole sync phase (planning/sync_phase.py)

    @property
    def estimate_s(self) -> float:
        return self.transfer_s + self.engine_s + self.latency_s

    @property
    def max_rank_send(self) -> int:
        return max(c.sent for c in self.counts)

    @property
    def max_rank_recv(self) -> int:
        return max(c.received for c in self.counts)

    def to_json(self) -> dict:
        busiest = self.counts[self.busiest_rank]
        return {"estimate_s": self.estimate_s, "max_rank_send_gb": self.max_rank_send / 1e9,
                "max_rank_recv_gb": self.max_rank_recv / 1e9, "model_gb": self.model_bytes / 1e9,
                "busiest_rank": self.busiest_rank, "busiest_sent_inter_gb": busiest.sent_inter / 1e9,
                "busiest_sent_intra_gb": busiest.sent_intra / 1e9, "transfer_s": self.transfer_s,
                "engine_s": self.engine_s, "latency_s": self.latency_s,
                **(self.phase.to_json() if self.phase is not None else {})}


def _transfer_seconds(c: ByteCount, bw: Bandwidth) -> float:
    return (max(c.sent_intra, c.recv_intra) / (bw.allgather_busbw_gbps * 1e9)
            + max(c.sent_inter, c.recv_inter) / (bw.ib_gbps * 1e9))


def sync_cost(cfg: Config, vocab_size: int, world_size: int, gpus_per_node: int,
              bw: Bandwidth = Bandwidth(), rates=None) -> SyncCost:
    """The cost of one weight sync of `cfg` on `world_size` GPUs, `gpus_per_node` per node, and of the whole
    sync phase around it (`rates`: sync_phase.PhaseRates, default H100)."""
    from megatron_rence.planning.sync_phase import PhaseRates, params_per_gpu, phase_cost

    m, p = cfg.model, cfg.parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    grid = Grid.megatron(p.tp, p.pp, dp, p.cp)
    tensors = sync_tensors(m, p, vocab_size)
    itemsize = DTYPE_BYTES[m.dtype]
    counts = rank_bytes(tensors, grid, feed_ranks(cfg, world_size), itemsize, gpus_per_node)
    busiest = max(range(world_size), key=lambda r: _transfer_seconds(counts[r], bw))
    params = model_params(m, vocab_size)
    model_bytes = params.total * itemsize
    engine_bytes = model_bytes
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang.fp8_weights:
        engine_bytes -= params.linear * (itemsize - 1)  # 1-byte linear weights (scales: 1 / 16384 of them)
    stage_bytes = max(sum(t.numel for t in tensors if t.stage == s) * itemsize for s in range(p.pp))
    rounds = max(1, -(-stage_bytes // cfg.weights.bucket_bytes)) * max(p.pp - 1, 1)
    calls = counts[busiest].collectives + rounds
    cost = SyncCost(counts, engine_bytes, model_bytes, _transfer_seconds(counts[busiest], bw),
                    bw.engine_copies * engine_bytes / (bw.hbm_gbps * 1e9), calls * bw.latency_us * 1e-6, busiest)
    cost.phase = phase_cost(cfg, vocab_size, cost, tensors, params_per_gpu(cfg, vocab_size), dp,
                            rates if rates is not None else PhaseRates(hbm_copy_gbps=bw.hbm_gbps))
    return cost
