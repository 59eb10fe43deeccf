"""Activation memory of the trainer: per-layer bytes per token (Korthikanti et al. 2022) and pipeline in-flight counts.

"Reducing Activation Recomputation in Large Transformer Models" (Korthikanti et al., 2022) counts, per layer
and per token of a GPT layer in 16-bit with dropout and unfused attention, 34*h + 5*a*s bytes; with tensor
parallelism t: 10*h + 24*h/t + 5*a*s/t; with sequence parallelism as well: (34*h + 5*a*s)/t; with selective
recomputation (attention core recomputed) 34*h/t; with full recomputation 2*h/t (the layer input). We keep
the paper's itemisation and generalise it to the layers this project trains (``LayerActivation``):

  replicated over TP unless sequence parallel (elements of `act_bytes` each):
      4*h    inputs of the two norms and of the two column-parallel linears (QKV, FC1)
      2*h    bytes of dropout masks (attention output, MLP output), only with dropout
  split over TP:
      a*d + 2*g*d   Q, K, V as saved for attention (GQA: g key/value groups of head dim d)
      a*d           attention output = input of the output projection
      3*f (SwiGLU: its 2*f input and the f-wide FC2 input) or 2*f (GeLU input and FC2 input)
  core attention, split over TP (dropped by selective recomputation):
      flash attention: 4*a bytes (fp32 log-sum-exp per head); unfused: (2 + 1 + 2)*a*s bytes with dropout
      (softmax output, mask, dropout output) or 2*a*s without.

With a = h/d = g, f = 4*h, GeLU, dropout and unfused attention this is exactly the paper's 34*h + 5*a*s
(tests check it). Megatron layers here have no dropout, SwiGLU and GQA; TE uses flash/fused attention.
Context parallelism divides every per-token term by cp through the token count (each rank holds s/cp tokens
of every sequence; unfused attention still spans all s keys).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_rence.config import ModelConfig, ParallelConfig


@dataclass(frozen=True)
class LayerActivation:
    """Bytes per token that one layer keeps for backward on one TP rank, without recomputation."""

    rest: float  # everything except the attention core
    core: float  # attention core (softmax/flash statistics): what selective recomputation drops
    layer_input: float  # the layer's input: what full recomputation keeps per checkpointed group

    @property
    def total(self) -> float:
        return self.rest + self.core


def layer_activation(m: ModelConfig, tp: int, sequence_parallel: bool, seq_len: int, act_bytes: int = 2,
                     flash: bool = True, gated: bool = True, dropout: bool = False) -> LayerActivation:
    """Per-token activation bytes of one layer on one TP rank; `seq_len` matters for unfused attention only."""
    h, a, g, d, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    sp_div = tp if sequence_parallel else 1
    replicated = 4 * h * act_bytes + (2 * h if dropout else 0)
    split = ((a * d + 2 * g * d) + a * d + (3 * f if gated else 2 * f)) * act_bytes
    if flash:
        core = 4.0 * a
    else:
        core = (act_bytes + (1 + act_bytes if dropout else 0)) * a * seq_len
    return LayerActivation(rest=replicated / sp_div + split / tp, core=core / tp, layer_input=h * act_bytes / sp_div)


def chunks_in_flight(p: ParallelConfig, stage: int, num_microbatches: int) -> int:
    """Model-chunk forward passes whose activations pipeline stage `stage` holds at its peak (1F1B schedules).

    Without virtual stages, stage r runs pp - r warm-up/first forwards before its first backward; with vpp
    chunks per rank megatron's interleaved schedule runs (pp - r - 1) * 2 + (vpp - 1) * pp + 1 chunk forwards
    first (microbatch_group_size_per_vp_stage = pp). Both are capped by the forwards in one step.
    """
    if p.vpp is None:
        return min(p.pp - stage, num_microbatches)
    return min((p.pp - stage - 1) * 2 + (p.vpp - 1) * p.pp + 1, num_microbatches * p.vpp)


def stage_activation_bytes(m: ModelConfig, p: ParallelConfig, stage: int, num_microbatches: int,
                           tokens_per_microbatch: int, layer: LayerActivation) -> float:
    """Peak activation bytes held by one TP rank of pipeline stage `stage` for the layers it owns.

    `tokens_per_microbatch` is per rank (micro_batch_size * padded max_seq_len / cp). Recomputation follows
    parallel.recompute: "selective" drops the attention core; "full" (uniform, recompute_num_layers = n)
    keeps one layer input per group of n layers and, during backward, the full activations of one group.
    """
    layers_per_chunk = m.num_layers // (p.pp * (p.vpp or 1))
    chunks = chunks_in_flight(p, stage, num_microbatches)
    if p.recompute == "none":
        per_token = chunks * layers_per_chunk * layer.total
    elif p.recompute == "selective":
        per_token = chunks * layers_per_chunk * layer.rest
    else:
        group = min(p.recompute_num_layers, layers_per_chunk)
        per_token = chunks * math.ceil(layers_per_chunk / group) * layer.layer_input + group * layer.total
    return per_token * tokens_per_microbatch
