"""Hugging Face `config.json` <-> the recipe's model section, for Llama-3, Qwen2.5 and Qwen3."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers

from megatron_rence.config import ModelConfig
from megatron_rence.weights.mapping import get_mapping

_ARCHS = {  # HF `model_type` -> (our arch, config class name)
    "llama": ("llama", "LlamaConfig"),
    "qwen2": ("qwen2", "Qwen2Config"),
    "qwen3": ("qwen3", "Qwen3Config"),
}
_CONFIG_CLASS = {arch: cls for arch, cls in _ARCHS.values()}
_TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def to_hf_config(model_cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> transformers.PretrainedConfig:
    """The transformers config of the model the recipe describes (unpadded `vocab_size`)."""
    m = model_cfg
    if m.arch not in _CONFIG_CLASS:
        raise ValueError(f"model.arch: no Hugging Face config for {m.arch!r} (known: {', '.join(_CONFIG_CLASS)})")
    get_mapping(m.arch).check(m)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_scaling:  # megatron's fixed Llama-3.1 constants; only the factor is configurable
        rope = {"rope_type": "llama3", "rope_theta": float(m.rotary_base), "factor": m.rope_scaling_factor,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    kwargs = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_query_groups, head_dim=m.head_dim, rms_norm_eps=m.norm_epsilon,
                  max_position_embeddings=m.max_position_embeddings, tie_word_embeddings=m.tie_word_embeddings,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    kwargs["dtype" if _TRANSFORMERS_5 else "torch_dtype"] = _TORCH_DTYPE[m.dtype]
    if m.arch in ("llama", "qwen3"):
        kwargs.update(attention_bias=False)
    if m.arch == "llama":
        kwargs.update(mlp_bias=False)
    if _TRANSFORMERS_5:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = rope.pop("rope_theta")
        kwargs["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    config = getattr(transformers, _CONFIG_CLASS[m.arch])(**kwargs)
    config.architectures = [config.__class__.__name__.replace("Config", "ForCausalLM")]
    return config


_TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_config_from_hf(source: str | Path | dict) -> dict[str, Any]:
    """ModelConfig fields from an HF checkpoint directory, a config.json path, or its parsed dict."""
    where = "config.json"
    if not isinstance(source, dict):
        path = Path(source)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        where = str(path)
        try:
            source = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
    hf = source
    model_type = hf.get("model_type")
    if model_type not in _ARCHS:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (known: {', '.join(_ARCHS)})")
    for key in ("attention_bias", "mlp_bias"):
        if model_type != "qwen2" and hf.get(key):
            raise ValueError(f"{where}: {key}=true is not supported (Megatron's layout has no bias on "
                             f"{'o_proj' if key == 'attention_bias' else 'the MLP'})")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                           "vocab_size") if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    fields: dict[str, Any] = {
        "arch": _ARCHS[model_type][0],
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "ffn_hidden_size": hf["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "rotary_base": float(theta),
        "norm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "add_qkv_bias": model_type == "qwen2",
        "qk_layernorm": model_type == "qwen3",
    }
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in fixed.items():  # megatron's RotaryEmbedding hard-codes these
            if float(rope.get(key, value)) != value:
                raise ValueError(f"{where}: llama3 rope {key}={rope[key]} is not supported (megatron uses {value})")
        fields.update(rope_scaling=True, rope_scaling_factor=float(rope.get("factor", 8.0)))
    elif rope_type not in ("default", None):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported")
    return fields
