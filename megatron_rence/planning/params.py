"""Parameter counts of a Llama / Qwen2.5 / Qwen3 decoder from the recipe's model section, whole and per trainer rank.

The count follows the HF checkpoint (unpadded vocabulary): embedding + layers (attention with GQA, optional
QKV bias and QK-norm, SwiGLU MLP, two RMSNorms) + final norm + output layer when untied. Per-rank counts
follow megatron's layout instead: the vocabulary is padded (``padded_vocab_size``) and split over TP, linear
weights and QKV biases are split over TP, norms are whole on every TP rank, and a pipeline stage holds
``num_layers / pp`` layers plus the embedding (first stage) or the final norm and output layer (last stage;
with tied embeddings and pp > 1 the last stage keeps its own copy of the embedding as the output layer).
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_rence.config import ModelConfig, ParallelConfig


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding (same rule as ``megatron.model.padded_vocab_size``, kept import-free here)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class LayerParams:
    """One transformer layer: `attention` and `mlp` are split over TP, `replicated` (norms) is not."""

    attention: int  # q, k, v, o projections (+ q, k, v biases)
    mlp: int  # gate, up, down projections
    replicated: int  # input_layernorm, pre_mlp_layernorm (+ q_layernorm, k_layernorm)

    @property
    def total(self) -> int:
        return self.attention + self.mlp + self.replicated

    def per_tp_rank(self, tp: int) -> int:
        return (self.attention + self.mlp) // tp + self.replicated


def layer_params(m: ModelConfig) -> LayerParams:
    h, d = m.hidden_size, m.head_dim
    q_dim, kv_dim = m.num_attention_heads * d, m.num_query_groups * d
    attention = h * (q_dim + 2 * kv_dim) + q_dim * h  # linear_qkv + linear_proj
    if m.add_qkv_bias:
        attention += q_dim + 2 * kv_dim
    mlp = 3 * h * m.ffn_hidden_size  # gate, up (linear_fc1) and down (linear_fc2)
    replicated = 2 * h + (2 * d if m.qk_layernorm else 0)
    return LayerParams(attention=attention, mlp=mlp, replicated=replicated)


@dataclass(frozen=True)
class ModelParams:
    embedding: int
    layer: LayerParams
    num_layers: int
    final_norm: int
    output: int  # 0 when the output layer is tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.num_layers * self.layer.total + self.final_norm + self.output

    @property
    def linear(self) -> int:
        """Parameters in the layers' linear projections (what FP8 GEMMs and FP8 serving quantise)."""
        return self.num_layers * (self.layer.attention + self.layer.mlp)


def model_params(m: ModelConfig, vocab_size: int) -> ModelParams:
    """Counts with an unpadded vocabulary of `vocab_size` rows, as in the HF checkpoint."""
    embedding = vocab_size * m.hidden_size
    return ModelParams(embedding=embedding, layer=layer_params(m), num_layers=m.num_layers,
                       final_norm=m.hidden_size, output=0 if m.tie_word_embeddings else embedding)


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one TP rank of pipeline stage `stage` (all of its virtual chunks together)."""

    stage: int
    params: int
    num_layers: int
    has_embedding: bool
    has_output: bool


def stage_params(m: ModelConfig, p: ParallelConfig, vocab_size: int) -> list[StageParams]:
    """One entry per pipeline stage; megatron's padded vocabulary; layers split evenly (checked elsewhere)."""
    vocab_rows = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, p.tp) // p.tp
    layers = m.num_layers // p.pp
    per_layer = layer_params(m).per_tp_rank(p.tp)
    stages = []
    for stage in range(p.pp):
        first, last = stage == 0, stage == p.pp - 1
        params = layers * per_layer
        if first:
            params += vocab_rows * m.hidden_size
        if last:
            params += m.hidden_size  # final norm
            if not m.tie_word_embeddings or p.pp > 1:
                params += vocab_rows * m.hidden_size
        stages.append(StageParams(stage=stage, params=params, num_layers=layers, has_embedding=first, has_output=last))
    return stages
