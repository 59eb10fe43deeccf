"""Pure name and layout mapping between full (TP-merged) Megatron tensors and Hugging Face tensors.

Layout facts (docs/design.md, "Layout facts"): `linear_qkv` interleaves per query group `[q (heads_per_group*head_dim),
k (head_dim), v (head_dim)] x num_query_groups`; `linear_fc1` is `[gate; up]`; embeddings and the output
layer are padded to a multiple of `make_vocab_size_divisible_by * tp` rows; with the Transformer Engine
spec the layer norms live inside the following linear as `layer_norm_weight`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron per-layer suffix -> HF per-layer suffix, for tensors that map one to one.
_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
}
_EMBED, _OUTPUT, _FINAL_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"

GetHF = Callable[[str], torch.Tensor]  # HF name -> full tensor (raises naming the tensor when absent)


@dataclass(frozen=True)
class Dims:
    """What the layouts depend on: heads, groups, head dim, vocabulary."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the unpadded vocabulary (rows of the HF embedding)
    tie_word_embeddings: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


@dataclass(frozen=True)
class ArchMapping:
    """Name and layout rules of one architecture family."""

    arch: str
    qkv_bias: bool
    qk_norm: bool
    te_spec: bool = False  # layer norms fused into linear_qkv / linear_fc1

    def check(self, model_cfg) -> None:
        """The recipe's model flags must be this family's (HF has no place for other combinations)."""
        for key, have, want in (("add_qkv_bias", model_cfg.add_qkv_bias, self.qkv_bias),
                                ("qk_layernorm", model_cfg.qk_layernorm, self.qk_norm)):
            if bool(have) != want:
                raise ValueError(f"model.{key}={have} does not fit model.arch={self.arch!r} "
                                 f"(its Hugging Face layout has {key}={want})")

    def to_hf(self, name: str, tensor: torch.Tensor, dims: Dims) -> list[tuple[str, torch.Tensor]]:
        """One full Megatron tensor (global layer index) -> its HF tensors (views, no copies)."""
        if name == _EMBED:
            return [("model.embed_tokens.weight", tensor[: dims.vocab_size])]
        if name == _OUTPUT:
            return [] if dims.tie_word_embeddings else [("lm_head.weight", tensor[: dims.vocab_size])]
        if name == _FINAL_NORM:
            return [("model.norm.weight", tensor)]
        layer, suffix = self._split(name)
        prefix = f"model.layers.{layer}."
        if suffix in _DIRECT:
            return [(prefix + _DIRECT[suffix], tensor)]
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            q, k, v = split_qkv(tensor, dims)
            return [(prefix + f"self_attn.{p}_proj.{kind}", t) for p, t in (("q", q), ("k", k), ("v", v))]
        if suffix == "mlp.linear_fc1.weight":
            gate, up = tensor.chunk(2, dim=0)
            return [(prefix + "mlp.gate_proj.weight", gate), (prefix + "mlp.up_proj.weight", up)]
        raise ValueError(f"{self.arch}: no HF name for Megatron parameter {name!r}")

    def from_hf_tensor(self, name: str, get: GetHF, dims: Dims, padded_vocab: int) -> torch.Tensor:
        """One full Megatron tensor (global layer index) built from the HF tensors it comes from.

        `get(hf_name)` returns a full HF tensor; the embedding and output layer come back padded to
        `padded_vocab` rows (zeros past the vocabulary). A tied output layer is the embedding.
        """
        if name == _EMBED or (name == _OUTPUT and dims.tie_word_embeddings):
            return pad_vocab(get("model.embed_tokens.weight"), padded_vocab)
        if name == _OUTPUT:
            return pad_vocab(get("lm_head.weight"), padded_vocab)
        if name == _FINAL_NORM:
            return get("model.norm.weight")
        layer, suffix = self._split(name)
        prefix = f"model.layers.{layer}."
        if suffix in _DIRECT:
            return get(prefix + _DIRECT[suffix])
        if suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = suffix.rsplit(".", 1)[1]
            return merge_qkv(*(get(prefix + f"self_attn.{p}_proj.{kind}") for p in "qkv"), dims)
        if suffix == "mlp.linear_fc1.weight":
            return torch.cat([get(prefix + "mlp.gate_proj.weight"), get(prefix + "mlp.up_proj.weight")], dim=0)
        raise ValueError(f"{self.arch}: no HF source for Megatron parameter {name!r}")

    def megatron_names(self, num_layers: int, tie_word_embeddings: bool) -> list[str]:
        """Every full Megatron parameter name of a model (global layer indices, model order)."""
        names = [_EMBED]
        for i in range(num_layers):
            names += [f"decoder.layers.{i}.{s}" for s in self.layer_suffixes()]
        names.append(_FINAL_NORM)
        if not tie_word_embeddings:
            names.append(_OUTPUT)
        return names

    def from_hf(self, hf: dict[str, torch.Tensor], num_layers: int, dims: Dims,
                padded_vocab: int) -> dict[str, torch.Tensor]:
        """A full HF state dict -> full Megatron tensors (local or TE spec names), vocabulary padded."""
        return {name: self.from_hf_tensor(name, lambda key: _get(hf, key), dims, padded_vocab)
                for name in self.megatron_names(num_layers, dims.tie_word_embeddings)}

    def layer_suffixes(self) -> list[str]:
        """Megatron per-layer parameter suffixes of this architecture and spec."""
        norms = (["self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"] if self.te_spec
                 else ["input_layernorm.weight", "pre_mlp_layernorm.weight"])
        names = norms + ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                         "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        if self.qkv_bias:
            names.append("self_attention.linear_qkv.bias")
        if self.qk_norm:
            names += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
        return names

    def with_te_spec(self, te_spec: bool) -> "ArchMapping":
        return ArchMapping(self.arch, self.qkv_bias, self.qk_norm, te_spec)

    def _split(self, name: str) -> tuple[str, str]:
        match = _LAYER.match(name)
        if match is None:
            raise ValueError(f"{self.arch}: no HF name for Megatron parameter {name!r}")
        return match.group(1), match.group(2)


def split_qkv(qkv: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[groups*(hpg+2)*hd, ...] interleaved -> q [heads*hd, ...], k [groups*hd, ...], v [groups*hd, ...]."""
    g, hpg, hd = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    expected = g * (hpg + 2) * hd
    if qkv.shape[0] != expected:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {expected} "
                         f"(groups={g}, heads_per_group={hpg}, head_dim={hd})")
    grouped = qkv.reshape(g, hpg + 2, hd, *qkv.shape[1:])
    rest = qkv.shape[1:]
    q = grouped[:, :hpg].reshape(g * hpg * hd, *rest)
    k = grouped[:, hpg].reshape(g * hd, *rest)
    v = grouped[:, hpg + 1].reshape(g * hd, *rest)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """Inverse of `split_qkv`."""
    g, hpg, hd = dims.num_query_groups, dims.heads_per_group, dims.head_dim
    rest = q.shape[1:]
    for name, t, rows in (("q_proj", q, g * hpg * hd), ("k_proj", k, g * hd), ("v_proj", v, g * hd)):
        if t.shape[0] != rows:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {rows} rows "
                             f"(groups={g}, heads_per_group={hpg}, head_dim={hd})")
    grouped = torch.cat([q.reshape(g, hpg, hd, *rest), k.reshape(g, 1, hd, *rest), v.reshape(g, 1, hd, *rest)], dim=1)
    return grouped.reshape(g * (hpg + 2) * hd, *rest)


def pad_vocab(tensor: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """[V, ...] -> [padded_vocab, ...] with zero rows appended (megatron's padded embedding layout)."""
    if tensor.shape[0] > padded_vocab:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows does not fit the padded size {padded_vocab}")
    if tensor.shape[0] == padded_vocab:
        return tensor
    pad = tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, pad], dim=0)


def _get(hf: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in hf:
        raise ValueError(f"HF checkpoint has no tensor {name!r}")
    return hf[name]
