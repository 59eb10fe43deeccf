"""Routes of the weight sync: which rank sends which TP piece of a pipeline stage's tensors to whom (pure Python).

Every data/context replica holds the same weights, so each replica feeds its own engine-feeding ranks
with no traffic between replicas. Inside a replica (a TP x PP grid of ranks) a tensor owned by stage
`o` reaches the ranks that need it in two steps::

    1. pieces across stages      each TP rank t of stage o holds piece t of the tensor (its TP shard; for a
                                 tensor replicated over TP, slice t of the flattened tensor);
                                 chain o -> o+1 -> ... (ring order, only stages whose whole TP group feeds
                                 an engine: "all" stages): TP rank t forwards piece t to TP rank t of the
                                 next stage of the chain, one hop per round; stage sends per rank ~ stage / TP;
                                 a rank that is alone (or not all) in its TP group feeding an engine
                                 ("some" stage) receives every piece straight from the owner's TP ranks
    2. TP all-gather             every rank of an "all" stage all-gathers the pieces in its TP group
                                 (a replicated tensor on its own stage needs nothing: every rank holds it)

No rank sends a piece to more than one chain successor plus the "some" ranks of its replica (none with
SGLang, where every rank feeds an engine; one with the CPU engine on rank 0). `Routes` is shared by the
transport (weights/sync.py), which counts the bytes of the messages it really sends, and by the cost
model (planning/sync_cost.py), which counts them from the recipe's tensor shapes without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

Coord = tuple[int, int, int, int]  # (dp, cp, pp, tp)
Strategy = Literal["all", "some", "none"]


@dataclass(frozen=True)
class Grid:
    """The global rank of every (dp, cp, pp, tp) coordinate."""

    tp: int
    pp: int
    dp: int
    cp: int
    ranks: tuple[tuple[Coord, int], ...]

    @classmethod
    def megatron(cls, tp: int, pp: int, dp: int, cp: int = 1) -> "Grid":
        """megatron's default order tp-cp-ep-dp-pp (tp varies fastest; dense models: ep = 1)."""
        ranks = tuple(((d, c, p, t), t + tp * (c + cp * (d + dp * p)))
                      for p in range(pp) for d in range(dp) for c in range(cp) for t in range(tp))
        return cls(tp, pp, dp, cp, ranks)

    @classmethod
    def from_coords(cls, coords: Iterable[tuple[int, Coord]], tp: int, pp: int, dp: int, cp: int) -> "Grid":
        """From every rank's (rank, (dp, cp, pp, tp)), e.g. gathered from the live process groups."""
        return cls(tp, pp, dp, cp, tuple(sorted(((c, r) for r, c in coords), key=lambda item: item[1])))

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    _rank_of: dict = field(default_factory=dict, compare=False, repr=False)
    _coord_of: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._rank_of.update(self.ranks)
        self._coord_of.update((r, c) for c, r in self.ranks)
        assert len(self._rank_of) == len(self._coord_of) == self.world_size, "one rank per coordinate"

    def rank(self, coord: Coord) -> int:
        return self._rank_of[coord]

    def coord(self, rank: int) -> Coord:
        return self._coord_of[rank]

    def replicas(self) -> list[tuple[int, int]]:
        return [(d, c) for d in range(self.dp) for c in range(self.cp)]


@dataclass(frozen=True)
class Hop:
    """One message: `src` sends its pieces of the owner stage's tensors to `dst`.

    `same_stage`: `dst` is on the owner stage itself (a "some" rank); it holds the TP-replicated tensors
    already, so the message carries only the TP-split ones."""

    src: int
    dst: int
    same_stage: bool


@dataclass
class Routes:
    """The routes for one grid and one set of engine-feeding ranks (`dst_ranks`)."""

    grid: Grid
    dst_ranks: frozenset
    _rounds: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dst_ranks = frozenset(self.dst_ranks)
        unknown = sorted(r for r in self.dst_ranks if r not in self.grid._coord_of)
        if unknown:
            raise ValueError(f"weight sync destination ranks {unknown} are outside the world of "
                             f"{self.grid.world_size} ranks")

    def needing(self, replica: tuple[int, int], stage: int) -> list[int]:
        """TP indices of the ranks of (replica, stage) that feed an engine."""
        d, c = replica
        return [t for t in range(self.grid.tp) if self.grid.rank((d, c, stage, t)) in self.dst_ranks]

    def strategy(self, replica: tuple[int, int], stage: int) -> Strategy:
        n = len(self.needing(replica, stage))
        return "all" if n == self.grid.tp else ("some" if n else "none")

    def chain(self, replica: tuple[int, int], owner: int) -> list[int]:
        """Stages a piece travels through, owner first, then the "all" stages in ring order."""
        pp = self.grid.pp
        rest = [(owner + k) % pp for k in range(1, pp)]
        return [owner] + [s for s in rest if self.strategy(replica, s) == "all"]

    def rounds(self, owner: int) -> list[list[Hop]]:
        """The messages for the owner stage's tensors, round by round (a relay forwards in the next round).

        Round 0 also holds the direct messages to "some" ranks. Identical on every rank."""
        if owner not in self._rounds:
            self._rounds[owner] = self._build_rounds(owner)
        return self._rounds[owner]

    def _build_rounds(self, owner: int) -> list[list[Hop]]:
        g = self.grid
        rounds: list[list[Hop]] = []

        def add(k: int, hop: Hop) -> None:
            while len(rounds) <= k:
                rounds.append([])
            rounds[k].append(hop)

        for d, c in g.replicas():
            stages = self.chain((d, c), owner)
            for k in range(len(stages) - 1):
                for t in range(g.tp):
                    add(k, Hop(g.rank((d, c, stages[k], t)), g.rank((d, c, stages[k + 1], t)), False))
            for stage in range(g.pp):
                if self.strategy((d, c), stage) != "some":
                    continue
                for tn in self.needing((d, c), stage):
                    dst = g.rank((d, c, stage, tn))
                    for t in range(g.tp):
                        src = g.rank((d, c, owner, t))
                        if src != dst:
                            add(0, Hop(src, dst, stage == owner))
        return rounds

    def gathers(self, rank: int, owner: int, replicated: bool) -> bool:
        """Whether `rank` takes part in the TP all-gather of a tensor of stage `owner`."""
        d, c, stage, _ = self.grid.coord(rank)
        if self.grid.tp == 1 or self.strategy((d, c), stage) != "all":
            return False
        return not (replicated and stage == owner)

    def ring_peers(self, rank: int) -> tuple[int, int]:
        """(next, previous) rank in this rank's TP group: where a ring all-gather sends and receives."""
        d, c, stage, t = self.grid.coord(rank)
        tp = self.grid.tp
        return self.grid.rank((d, c, stage, (t + 1) % tp)), self.grid.rank((d, c, stage, (t - 1) % tp))


def piece_numel(full_numel: int, tp: int, tp_split: bool) -> int:
    """Elements of one TP piece: the shard of a TP-split tensor, else ceil(numel / tp) (the last piece is padded)."""
    if tp_split:
        assert full_numel % tp == 0, (full_numel, tp)
        return full_numel // tp
    return -(-full_numel // tp)


@dataclass
class ByteCount:
    """Bytes one rank sends and receives in a sync, split by whether the peer is on the same node."""

    sent_intra: int = 0
    sent_inter: int = 0
    recv_intra: int = 0
    recv_inter: int = 0
    messages: int = 0  # point-to-point messages sent
    collectives: int = 0  # TP all-gathers taken part in

    @property
    def sent(self) -> int:
        return self.sent_intra + self.sent_inter

    @property
    def received(self) -> int:
        return self.recv_intra + self.recv_inter

    def add(self, me: int, peer: int, nbytes: int, send: bool, gpus_per_node: Optional[int]) -> None:
        """Count one transfer; with `gpus_per_node` unknown every peer counts as intra-node."""
        inter = gpus_per_node is not None and me // gpus_per_node != peer // gpus_per_node
        if send:
            if inter:
                self.sent_inter += nbytes
            else:
                self.sent_intra += nbytes
        elif inter:
            self.recv_inter += nbytes
        else:
            self.recv_intra += nbytes
