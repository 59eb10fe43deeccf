"""Batches of (prompt + response) token sequences for the trainer: padded [B, S] or packed THD with cu_seqlens.

A sequence is ``(token_ids, prompt_len)``. Position t predicts token t+1, so ``targets[t] = tokens[t+1]``
and ``loss_mask[t] = 1`` exactly for the positions whose target is a response token
(``prompt_len - 1 <= t <= len - 2``): prompt tokens never count.

Two layouts:
* ``pad_batch`` (``train.packing=false``): right padding, so the causal mask alone keeps real tokens from
  attending to padding and no padding mask is needed.
* ``pack_thd`` (``train.packing``, the default): sequences concatenated into one row [1, T] with megatron's
  ``PackedSeqParams(qkv_format="thd")``; each sequence is padded to ``pad_multiple(...)``. Transformer Engine
  attends within each sequence on GPU, ``attention.LocalCoreAttention`` on CPU. ``plan_token_budget`` groups
  items into microbatches by a token budget; ``packed_to_rows`` maps a packed row's values to the padded layout.
Padding rules (``pad_multiple``): context parallelism cuts a sequence into 2*cp chunks and sequence
parallelism cuts a CP rank's part over tp ranks, so the length is a multiple of ``cp * lcm(2, tp)`` (CP and
SP), ``2*cp`` (CP) or ``tp`` (SP). Transformer Engine's FP8 GEMMs need each rank's token count (rows x
length / (tp * cp)) to be a multiple of ``fp8_align`` (16; 128 for the blockwise recipe, as NeMo-RL pads).
Context parallelism splits every sequence into 2*cp chunks and gives rank r chunks r and 2*cp-1-r
(megatron's load balancing for causal attention): ``split_padded_for_cp`` / ``split_packed_for_cp``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

IGNORE = -1  # target id of positions without a next token (see logprobs.vocab_parallel_logprobs)


# model.fp8 recipe -> the multiple of tokens per rank its GEMMs need (delayed / tensorwise: 16; blockwise
# 1x128 / 128x128 scaling tiles: 128)
FP8_ALIGN = {"delayed": 16, "tensorwise": 16, "blockwise": 128}


def fp8_align_for(recipe: Optional[str]) -> int:
    """Tokens per rank must be a multiple of this under `model.fp8=recipe` (1 without FP8)."""
    if recipe is None:
        return 1
    if recipe not in FP8_ALIGN:
        raise ValueError(f"model.fp8: unknown recipe {recipe!r} (known: {sorted(FP8_ALIGN)})")
    return FP8_ALIGN[recipe]


def pad_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False, fp8_align: int = 1,
                 rows: int = 1) -> int:
    """The length every sequence of a [rows, S] batch (or every packed sequence, rows=1) is padded to a
    multiple of, so that the CP and SP splits are even and each rank's rows * S / (tp_sp * cp) tokens are a
    multiple of `fp8_align` (tp_sp: tp with sequence parallelism, else 1)."""
    tp_split = tp if sequence_parallel and tp > 1 else 1
    multiple = cp * math.lcm(2 if cp > 1 else 1, tp_split)
    if fp8_align > 1:
        tokens = tp_split * cp * fp8_align  # rows * S must be a multiple of this
        multiple = math.lcm(multiple, tokens // math.gcd(tokens, rows))
    return multiple


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check(sequences: Sequence[tuple[Sequence[int], int]]) -> None:
    if not sequences:
        raise ValueError("no sequences to batch")
    for i, (tokens, prompt_len) in enumerate(sequences):
        if not 1 <= prompt_len <= len(tokens):
            raise ValueError(f"sequence {i}: prompt_len={prompt_len} must be in [1, len(token_ids)={len(tokens)}]")


def _targets_and_mask(tokens: Sequence[int], prompt_len: int) -> tuple[list[int], list[float]]:
    n = len(tokens)
    targets = list(tokens[1:]) + [IGNORE]
    mask = [1.0 if prompt_len - 1 <= t <= n - 2 else 0.0 for t in range(n)]
    return targets, mask


@dataclass
class PaddedBatch:
    """Right-padded batch. tokens, position_ids, targets (IGNORE off-sequence): [B, S] long; loss_mask: [B, S]
    float; lengths, prompt_lens: [B] long."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor

    def to(self, device) -> "PaddedBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def response_logprobs(self, token_logprobs: torch.Tensor) -> list[torch.Tensor]:
        """[B, S] per-position log-probs -> per sequence, the log-probs of its response tokens in order."""
        return [token_logprobs[b, p - 1:n - 1] for b, (p, n) in
                enumerate(zip(self.prompt_lens.tolist(), self.lengths.tolist()))]


def pad_batch(sequences: Sequence[tuple[Sequence[int], int]], pad_id: int, multiple: int = 1) -> PaddedBatch:
    """Right-pad sequences to the longest length rounded up to `multiple` (see `pad_multiple`)."""
    _check(sequences)
    width = _round_up(max(len(t) for t, _ in sequences), multiple)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    loss_mask = torch.zeros(len(sequences), width)
    for b, (seq, prompt_len) in enumerate(sequences):
        n = len(seq)
        tgt, mask = _targets_and_mask(seq, prompt_len)
        tokens[b, :n] = torch.tensor(seq, dtype=torch.long)
        targets[b, :n] = torch.tensor(tgt, dtype=torch.long)
        loss_mask[b, :n] = torch.tensor(mask)
    positions = torch.arange(width).unsqueeze(0).expand(len(sequences), -1).contiguous()
    return PaddedBatch(tokens, positions, targets, loss_mask,
                       torch.tensor([len(t) for t, _ in sequences]), torch.tensor([p for _, p in sequences]))


@dataclass
class PackedBatch:
    """THD batch: tokens, position_ids, targets, loss_mask [1, T]; seq_index [T] (-1 on padding);
    cu_seqlens / cu_seqlens_padded [N+1] int32 offsets of real / padded sequences; max_seqlen (padded)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    seq_index: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    max_seqlen: int
    prompt_lens: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device) -> "PackedBatch":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)

    def packed_seq_params(self):
        """megatron's PackedSeqParams for TE attention (qkv_format="thd")."""
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               cu_seqlens_q_padded=self.cu_seqlens_padded,
                               cu_seqlens_kv_padded=self.cu_seqlens_padded,
                               max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen)


def pack_thd(sequences: Sequence[tuple[Sequence[int], int]], pad_id: int, multiple: int = 1,
             total_multiple: Optional[int] = None) -> PackedBatch:
    """Concatenate sequences, each padded to a multiple of `multiple`, into one [1, T] row; the last one is
    padded further so that T is a multiple of `total_multiple` (FP8: ``pad_multiple(..., fp8_align=...)``)."""
    _check(sequences)
    total_multiple = multiple if total_multiple is None else total_multiple
    if total_multiple % multiple:
        raise ValueError(f"total_multiple={total_multiple} must be a multiple of multiple={multiple}")
    total = _round_up(sum(_round_up(len(t), multiple) for t, _ in sequences), total_multiple)
    tokens, positions, targets, mask, index = [], [], [], [], []
    cu_padded = [0]
    for i, (seq, prompt_len) in enumerate(sequences):
        n, padded = len(seq), _round_up(len(seq), multiple)
        if i == len(sequences) - 1:
            padded = total - cu_padded[-1]
        tgt, m = _targets_and_mask(seq, prompt_len)
        tokens += list(seq) + [pad_id] * (padded - n)
        targets += tgt + [IGNORE] * (padded - n)
        mask += m + [0.0] * (padded - n)
        positions += list(range(padded))
        index += [i] * n + [-1] * (padded - n)
        cu_padded.append(cu_padded[-1] + padded)
    row = lambda values, dtype: torch.tensor(values, dtype=dtype).unsqueeze(0)  # noqa: E731
    # TE: cu_seqlens are cumulative real lengths; sequence i's tokens start at cu_seqlens_padded[i]
    lengths = torch.tensor([len(t) for t, _ in sequences], dtype=torch.int32)
    cu_real = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    return PackedBatch(row(tokens, torch.long), row(positions, torch.long), row(targets, torch.long),
                       row(mask, torch.float32), torch.tensor(index, dtype=torch.long), cu_real,
                       torch.tensor(cu_padded, dtype=torch.int32), max(b - a for a, b in zip(cu_padded, cu_padded[1:])),
                       torch.tensor([p for _, p in sequences]))


def cp_chunk_indices(length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions of one sequence (length divisible by 2*cp) that CP rank `cp_rank` holds, in order."""
    if length % (2 * cp_size):
        raise ValueError(f"sequence length {length} is not divisible by 2*cp={2 * cp_size}; pad with pad_multiple")
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([first, second])


def split_padded_for_cp(batch: PaddedBatch, cp_rank: int, cp_size: int) -> PaddedBatch:
    """This CP rank's part of every row (same chunks for all rows): [B, S] -> [B, S/cp]."""
    if cp_size == 1:
        return batch
    idx = cp_chunk_indices(batch.tokens.shape[1], cp_rank, cp_size).to(batch.tokens.device)
    return replace(batch, tokens=batch.tokens[:, idx], position_ids=batch.position_ids[:, idx],
                   targets=batch.targets[:, idx], loss_mask=batch.loss_mask[:, idx])


def split_packed_for_cp(batch: PackedBatch, cp_rank: int, cp_size: int) -> PackedBatch:
    """This CP rank's part of every packed sequence: [1, T] -> [1, T/cp]; cu_seqlens stay global (TE's
    convention: attention receives the global offsets and the CP group)."""
    if cp_size == 1:
        return batch
    offsets = batch.cu_seqlens_padded.tolist()
    idx = torch.cat([start + cp_chunk_indices(end - start, cp_rank, cp_size)
                     for start, end in zip(offsets, offsets[1:])]).to(batch.tokens.device)
    return replace(batch, tokens=batch.tokens[:, idx], position_ids=batch.position_ids[:, idx],
                   targets=batch.targets[:, idx], loss_mask=batch.loss_mask[:, idx], seq_index=batch.seq_index[idx])


def unpack_response_logprobs(batch: PackedBatch, token_logprobs: torch.Tensor) -> list[torch.Tensor]:
    """[1, T] per-position log-probs of a packed batch (not CP-split) -> per-sequence response log-probs."""
    flat = token_logprobs.reshape(-1)
    starts = batch.cu_seqlens_padded.tolist()
    ends = (batch.cu_seqlens_padded[:-1] + batch.cu_seqlens.diff()).tolist()
    return [flat[s + p - 1:e - 1] for s, e, p in zip(starts, ends, batch.prompt_lens.tolist())]



def packed_to_rows(batch: PackedBatch, token_values: torch.Tensor, width: int) -> torch.Tensor:
    """[1, T] (or [T]) per-position values of a packed batch (not CP-split) -> [N, width] in the padded layout
    (row i, column j = position j of sequence i; 0 past its real length). Differentiable (a gather)."""
    flat = token_values.reshape(-1)
    lengths = batch.cu_seqlens.diff().to(flat.device)
    columns = torch.arange(width, device=flat.device)
    index = batch.cu_seqlens_padded[:-1].to(flat.device).long().unsqueeze(1) + columns.unsqueeze(0)
    index = torch.where(columns.unsqueeze(0) < lengths.unsqueeze(1), index, flat.numel())
    return torch.cat([flat, flat.new_zeros(1)])[index]


def packed_cp_positions(batch: PackedBatch, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Positions in the packed row [1, T] that CP rank `cp_rank` holds, in its local order (split_packed_for_cp)."""
    offsets = batch.cu_seqlens_padded.tolist()
    return torch.cat([start + cp_chunk_indices(end - start, cp_rank, cp_size)
                      for start, end in zip(offsets, offsets[1:])])


def plan_token_budget(costs: Sequence[int], budget: int, dp_size: int) -> list[list[list[int]]]:
    """Token-budget microbatches: for each data-parallel rank, its microbatches as lists of item indices.

    Items (whole groups for training, sequences for log-prob passes) cost `costs[i]` tokens (padded lengths).
    Items go to the rank with the fewest tokens so far, largest first (balanced work per rank); each rank's
    items are packed first-fit-decreasing into microbatches of at most `budget` tokens (an item above the
    budget gets a microbatch of its own). Every rank gets the same number of microbatches: shorter plans end
    with empty ones (filler, contributing nothing). Deterministic, so every rank computes the same plan.
    """
    if budget < 1:
        raise ValueError(f"train.max_tokens_per_microbatch: must be >= 1 here, got {budget}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads, shares = [0] * dp_size, [[] for _ in range(dp_size)]
    for i in order:
        rank = min(range(dp_size), key=lambda r: (loads[r], len(shares[r]), r))
        shares[rank].append(i)
        loads[rank] += costs[i]
    plans = []
    for share in shares:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in share:
            fit = next((b for b in range(len(bins)) if room[b] >= costs[i]), None)
            if fit is None:
                bins.append([i])
                room.append(budget - costs[i])
            else:
                bins[fit].append(i)
                room[fit] -= costs[i]
        plans.append([sorted(b) for b in bins])
    count = max(1, max(len(p) for p in plans))
    return [p + [[] for _ in range(count - len(p))] for p in plans]
