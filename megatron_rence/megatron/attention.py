"""Causal core attention for the local (non-TE) layer spec: padded [s, b] and packed THD batches, GQA, TP, CP.

megatron's local ``DotProductAttention`` rejects packed sequences and context parallelism (both need Transformer
Engine). ``LocalCoreAttention`` takes its place as the spec's ``core_attention`` (same constructor, same forward
signature) so the CPU path (and a GPU without TE) trains on packed batches:

* padded: query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np*hn], causal;
* packed (``packed_seq_params.qkv_format == "thd"``): query [t, np, hn], key/value [t, ng, hn] -> [t, np*hn],
  block-diagonal causal attention over the sequences delimited by ``cu_seqlens_q_padded`` (else ``cu_seqlens_q``):
  sequences of one power-of-two length class are gathered into a padded [n, Lmax] batch for one causal
  ``scaled_dot_product_attention`` call, so the cost is within 4x of sum(L_i^2) (never T^2) in a few calls.
  Padding slots at the end of a sequence belong to it; real tokens never see them (they come later).

GQA: query head j uses key/value group j // (np / ng) (megatron's ``repeat_interleave``). TP: heads are split
over ``pg_collection.tp``. Softmax scale: ``softmax_scale`` or 1/sqrt(head_dim) (megatron's
``apply_query_key_layer_scaling`` multiplies back its coefficient, so the net scale is the same).

Context parallelism (the layout of ``packing.cp_chunk_indices``: rank r holds chunks r and 2cp-1-r of every
sequence, padded to a multiple of 2cp): keys and values are all-gathered over the CP group (backward: the
gradient is summed over the group and each rank keeps its own part), re-ordered into each sequence's natural
order, and every local query attends to the keys at global positions <= its own. Exact, not a ring: memory for
K/V is that of the whole sequence, which is fine for the CPU tests and runs this module exists for.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from megatron_rence.megatron.packing import cp_chunk_indices


class _AllGatherSeq(torch.autograd.Function):
    """[n, ...] on each rank of `group` -> [size * n, ...] (rank order); backward: summed over the group, own rows."""

    @staticmethod
    def forward(ctx, x, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rows, ctx.rank = group, x.shape[0], rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class LocalCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron's local spec (constructor and forward as DotProductAttention's)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"LocalCoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"LocalCoreAttention has no attention dropout (got {dropout}); set it to 0")
        if config.window_size is not None or config.softmax_type != "vanilla":
            raise ValueError("LocalCoreAttention supports neither window_size nor softmax_type != 'vanilla'")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_size = 1 if self.cp_group is None else self.cp_group.size()
        self.cp_rank = 0 if self.cp_group is None else self.cp_group.rank()

    # q [L, (b,) h, d], k / v [Lk, (b,) g, d] -> [L, (b,) h*d]; q_pos / k_pos: global positions (None: plain
    # causal, q and k aligned)
    def _attend(self, q, k, v, q_pos=None, k_pos=None) -> torch.Tensor:
        rep = self.num_heads // self.num_groups
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
        # [L, h, d] -> [h, L, d]; [L, b, h, d] -> [b, h, L, d]
        order, inverse = ((1, 0, 2), (1, 0, 2)) if q.dim() == 3 else ((1, 2, 0, 3), (2, 0, 1, 3))
        q, k, v = (x.permute(*order) for x in (q, k, v))
        if q_pos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        out = out.permute(*inverse)  # back to [L, (b,) h, d]
        return out.reshape(*out.shape[:-2], -1)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return _AllGatherSeq.apply(x, self.cp_group)

    def _padded(self, query, key, value) -> torch.Tensor:
        """[sq, b, np, hn] (this CP rank's chunks of every row) -> [sq, b, np*hn], all rows in one call."""
        if self.cp_size == 1:
            return self._attend(query, key, value)
        width = query.shape[0] * self.cp_size
        k_pos = torch.cat([cp_chunk_indices(width, r, self.cp_size) for r in range(self.cp_size)]).to(query.device)
        q_pos = cp_chunk_indices(width, self.cp_rank, self.cp_size).to(query.device)
        return self._attend(query, self._gather(key), self._gather(value), q_pos, k_pos)

    def _packed(self, query, key, value, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """[t, np, hn] (this CP rank's chunks of every sequence, offsets cu_seqlens / cp) -> [t, np*hn]."""
        bounds = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(bounds, bounds[1:])]
        local = [n // self.cp_size for n in lengths]
        starts = [0]
        for n in local:
            starts.append(starts[-1] + n)
        assert starts[-1] == query.shape[0], "cu_seqlens disagree with the packed tokens"
        if self.cp_size > 1:
            key, value = self._gather(key), self._gather(value)  # [cp * t, ng, hn], rank-major
        if self.cp_size == 1:
            return self._packed_buckets(query, key, value, lengths)
        t = query.shape[0]
        outs = []
        for i, n in enumerate(lengths):
            if n == 0:
                continue
            q = query[starts[i]:starts[i + 1]]
            rows = torch.cat([torch.arange(r * t + starts[i], r * t + starts[i + 1]) for r in range(self.cp_size)])
            k_pos = torch.cat([cp_chunk_indices(n, r, self.cp_size) for r in range(self.cp_size)])
            q_pos = cp_chunk_indices(n, self.cp_rank, self.cp_size)
            rows = rows.to(query.device)
            outs.append(self._attend(q, key[rows], value[rows], q_pos.to(query.device), k_pos.to(query.device)))
        return torch.cat(outs, dim=0)

    def _packed_buckets(self, query, key, value, lengths: list[int]) -> torch.Tensor:
        """Without CP: sequences of similar length (same power-of-two class) run as one padded causal batch
        [n, Lmax] (as the padded path would, padding bounded by the class), then scatter back; one SDPA call
        per length class instead of one per sequence."""
        t = query.shape[0]
        starts = torch.tensor([0] + lengths).cumsum(0)
        classes: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            if n:
                classes.setdefault((n - 1).bit_length(), []).append(i)
        ext = [torch.cat([x, x.new_zeros(1, *x.shape[1:])]) for x in (query, key, value)]  # row t: zeros
        positions, outs = [], []
        for members in classes.values():
            longest = max(lengths[i] for i in members)
            columns = torch.arange(longest)
            index = starts[members].unsqueeze(1) + columns.unsqueeze(0)  # [n, Lmax]
            valid = columns.unsqueeze(0) < torch.tensor([lengths[i] for i in members]).unsqueeze(1)
            index = torch.where(valid, index, t).to(query.device)
            q, k, v = (x[index].transpose(0, 1) for x in ext)  # [Lmax, n, h, d]
            out = self._attend(q, k, v).transpose(0, 1)  # [n, Lmax, h*d]
            valid = valid.to(query.device)
            positions.append(index[valid])
            outs.append(out[valid])
        order = torch.argsort(torch.cat(positions))
        return torch.cat(outs)[order]

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("LocalCoreAttention builds its own causal mask: pass attention_mask=None")
        if packed_seq_params is None:
            return self._padded(query, key, value)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"LocalCoreAttention: packed format {packed_seq_params.qkv_format!r} (only 'thd')")
        cu = packed_seq_params.cu_seqlens_q_padded
        cu = packed_seq_params.cu_seqlens_q if cu is None else cu
        return self._packed(query, key, value, cu)
