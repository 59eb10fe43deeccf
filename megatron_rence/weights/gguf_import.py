"""A GGUF checkpoint (llama.cpp format, e.g. Q4_1) -> a Hugging Face folder (safetensors, config, tokenizer).

    info = convert_gguf(Path("model.Q4_1.gguf"), Path("out_hf"))   # dequantized fp32 weights
    text = check_conversion(Path("out_hf"), gguf_path=Path("model.Q4_1.gguf"))

transformers reads GGUF files itself (`from_pretrained(..., gguf_file=...)`, which needs the `gguf` and
`accelerate` packages: `pip install -e ".[real]"`) and dequantizes every tensor. On transformers 5.x the
loaded model still carries `config.quantization_config` (a GgufConfig) although its weights are plain
floats; a folder saved from it would ask every later loader for the GGUF machinery. So the model is
rebuilt from a config without that entry, the dequantized tensors are copied in (strictly: every name
must match), and that model is saved. The tokenizer (vocabulary, merges, special tokens and the chat
template, all stored in the GGUF metadata) is saved next to it. Writes go to a temporary folder renamed
into place, so an interrupted conversion leaves no half-written OUT_DIR.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_rence.weights.portable import make_portable

CHECK_PROMPT = "What is 2 + 3?"


def _require_gguf_deps() -> None:
    missing = []
    for module in ("gguf", "accelerate"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"converting a GGUF file needs {' and '.join(missing)}: pip install -e \".[real]\"")


def load_gguf(gguf_path: Path, dtype: torch.dtype = torch.float32):
    """(model with dequantized weights, tokenizer) as transformers reads `gguf_path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_deps()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def plain_model(loaded, dtype: torch.dtype = torch.float32):
    """`loaded` rebuilt from its config without `quantization_config`, with the same tensors (see the docstring)."""
    from transformers import AutoModelForCausalLM

    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(loaded.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = loaded.state_dict()
    result = model.load_state_dict(state, strict=False)
    expected_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - expected_missing:
        raise ValueError(f"GGUF tensors do not match {type(model).__name__}: missing "
                         f"{sorted(set(result.missing_keys) - expected_missing)}, unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> dict:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files with the chat template); returns
    {"architecture", "num_parameters", "vocab_size", "transformers"}. `out_dir` must not exist yet."""
    import transformers

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; convert into a new folder")
    loaded, tokenizer = load_gguf(gguf_path, dtype)
    model = plain_model(loaded, dtype)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path}: no tokenizer.chat_template in the GGUF metadata")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the folder is meant to be shared like any model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        make_portable(tmp)  # transformers 4.57.1 (SGLang's) reads the same RoPE base and tokenizer
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"architecture": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size, "transformers": transformers.__version__}


def check_conversion(hf_dir: Path, gguf_path: Path | None = None, prompt: str = CHECK_PROMPT,
                     max_new_tokens: int = 16) -> str:
    """Greedy `max_new_tokens` continuation of the chat-rendered `prompt` by the saved folder.

    With `gguf_path`, the folder's logits on that prompt must equal (exactly: same fp32 tensors) those of
    the model transformers reads from the GGUF, and the greedy continuations must be the same. Raises
    ValueError on a mismatch or an empty continuation; returns the continuation's text.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1]:]
        if gguf_path is not None:
            reference, _ = load_gguf(gguf_path)
            diff = (model(ids).logits - reference(ids).logits).abs().max().item()
            if diff != 0.0:
                raise ValueError(f"{hf_dir}: logits differ from the GGUF model's by up to {diff:.3g}")
            ref_out = reference.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1]:]
            if out.tolist() != ref_out.tolist():
                raise ValueError(f"{hf_dir}: greedy continuation {out.tolist()} != the GGUF model's {ref_out.tolist()}")
    if len(out) == 0:
        raise ValueError(f"{hf_dir}: the model generated nothing for {prompt!r}")
    return tokenizer.decode(out, skip_special_tokens=True)
