"""Model folders that read the same under transformers 4.57.1 (SGLang 0.5.5.post3's pin) and 5.x (ours).

transformers 5.x writes the RoPE base only inside `rope_parameters`; 4.57.1 ignores that field and SGLang's
model classes (llama.py, qwen2.py: `getattr(config, "rope_theta", default)`) then silently build the model
with base 10000 (measured: SmolLM2-135M's log-probs off by 0.32 nats per token). 5.x also names the fast
tokenizer `TokenizersBackend`, which 4.57.1 cannot load; `PreTrainedTokenizerFast` reads the same
tokenizer.json with identical ids in both. `make_portable` adds the top-level `rope_theta` (and the 4.x
`rope_scaling` for a non-default RoPE type) and renames the tokenizer class; 5.x reads the same values back.
Every folder we write for another reader goes through it: the SGLang engine's model dir, HF exports,
GGUF-converted (prepared) models and the tests' model fixtures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_FAST_TOKENIZER = "PreTrainedTokenizerFast"
_V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)


def portable_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json's dict with the RoPE fields 4.57.1 reads, equal to the `rope_parameters` 5.x reads."""
    out = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        theta = rope["rope_theta"]
        if "rope_theta" in config and float(config["rope_theta"]) != float(theta):
            raise ValueError(f"config.json: rope_theta={config['rope_theta']} disagrees with "
                             f"rope_parameters.rope_theta={theta}")
        out["rope_theta"] = theta
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            out["rope_scaling"] = scaling
    return out


def _rewrite_json(path: Path, update) -> None:
    data = json.loads(path.read_text())
    new = update(data)
    if new != data:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def portable_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        return dict(config, tokenizer_class=_FAST_TOKENIZER)
    return config


def make_portable(model_dir: str | os.PathLike) -> None:
    """Rewrite `model_dir`'s config.json and tokenizer_config.json (where present) in place, atomically."""
    model_dir = Path(model_dir)
    if (model_dir / "config.json").is_file():
        _rewrite_json(model_dir / "config.json", portable_config)
    if (model_dir / "tokenizer_config.json").is_file() and (model_dir / "tokenizer.json").is_file():
        _rewrite_json(model_dir / "tokenizer_config.json", portable_tokenizer_config)
