"""Quantized Hugging Face export of a Megatron checkpoint with NVIDIA Model Optimizer (nvidia-modelopt).

    tools/export_megatron_to_hf.py CKPT OUT_DIR --quant fp8 [--recipe RECIPE] [--calib-prompts 16]

The checkpoint is loaded at TP=1 / PP=1 in this one process (dist checkpoints reshard on load), copied into
a model whose vocabulary is not padded (modelopt's exporter writes the embedding and output layer as they
are, padding rows included, while config.json keeps the real vocab_size: see docs/design.md, "modelopt"),
calibrated on the first `calib_prompts` prompts of the recipe's data (its template, tokenizer and order),
quantized by `modelopt.torch.quantization.quantize`, and written by modelopt's own Megatron exporter
(`export_mcore_gpt_to_hf`): safetensors with float8_e4m3fn linear weights and float32 `weight_scale` /
`input_scale`, `hf_quant_config.json`, and config.json's `quantization_config` (quant_method modelopt),
the layout SGLang's `modelopt` quantization method, vLLM and TensorRT-LLM load. Embeddings, norms and the
output layer stay in `dtype`. The result is written to a temporary sibling and renamed into place.

Formats (`QUANT_FORMATS`): fp8 = modelopt FP8_DEFAULT_CFG, per-tensor FP8 weights and static per-tensor FP8
activation scales (runs on CPU); nvfp4 = NVFP4_DEFAULT_CFG (modelopt's NVFP4 calibration asserts CUDA
tensors, so it needs a GPU). FP8 block-wise is the non-modelopt `fp8_block` option of
`weights.convert.export_hf` (SGLang's `fp8` method): modelopt's FP8_2D_BLOCKWISE export is not loadable by
SGLang 0.5.5.post3's modelopt method (per-tensor scales only) and fails on dims that are not multiples of 128.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from megatron_rence.config import ModelConfig, ParallelConfig

QUANT_FORMATS = {"fp8": "FP8_DEFAULT_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}  # what hf_quant_config.json's quant_algo must say
GPU_ONLY = {"nvfp4": "modelopt's NVFP4 calibration (dynamic block quantizer) asserts CUDA tensors"}
MODELOPT_HINT = 'needs nvidia-modelopt: pip install -e ".[export]" (tools/setup_env.sh installs it)'


def check_quant(quant: str) -> None:
    """ValueError naming --quant when the format is unknown, needs a GPU here, or modelopt is missing."""
    if quant not in QUANT_FORMATS:
        raise ValueError(f"--quant {quant!r}: expected one of {', '.join(QUANT_FORMATS)} (modelopt) or fp8_block")
    if quant in GPU_ONLY and not torch.cuda.is_available():
        raise ValueError(f"--quant {quant} needs a GPU: {GPU_ONLY[quant]}")
    try:
        import modelopt.torch.quantization  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--quant {quant} {MODELOPT_HINT} ({exc})") from None


def calibration_prompts(recipe_path: Path, num_prompts: int) -> list[list[int]]:
    """Token ids of the first `num_prompts` prompts of the recipe's data, rendered as training renders them."""
    from megatron_rence.data.prompts import PromptDataset
    from megatron_rence.data.tokenizer import load_tokenizer
    from megatron_rence.recipe import load_recipe

    if num_prompts < 1:
        raise ValueError(f"--calib-prompts={num_prompts}: need at least one calibration prompt")
    cfg = load_recipe(recipe_path)
    dataset = PromptDataset(cfg.data, load_tokenizer(cfg.model))
    return [p.token_ids for p in dataset.next_batch(min(num_prompts, len(dataset)))]


def find_recipe(ckpt: str | os.PathLike, recipe: Optional[str]) -> Path:
    """The recipe whose data calibrates: `recipe`, else the run's config.yaml next to its checkpoints/."""
    path = Path(ckpt)
    root = path.parent if path.name.startswith("iter_") else path
    found = Path(recipe) if recipe is not None else root.parent / "config.yaml"
    if not found.is_file():
        raise ValueError(f"--quant calibrates on the recipe's prompts: no recipe at {found} (pass --recipe)")
    return found


@torch.no_grad()
def unpadded_copy(model, model_cfg: ModelConfig, vocab_size: int):
    """A GPTModel like `model` (same parameters) whose embedding / output layer have exactly `vocab_size` rows."""
    from megatron_rence.megatron.model import build_model

    exact = build_model(replace(model_cfg, make_vocab_size_divisible_by=1), ParallelConfig(), vocab_size)[0]
    source = dict(model.named_parameters())
    for name, param in exact.named_parameters():
        src = source[name]
        if src.shape != param.shape:
            assert src.shape[1:] == param.shape[1:] and src.shape[0] >= param.shape[0], name
            src = src[: param.shape[0]]
        param.copy_(src)
    return exact


def write_source_dir(src: Path, model_cfg: ModelConfig, vocab_size: int, out_dtype: str,
                     side: Optional[Path]) -> None:
    """config.json (+ tokenizer / generation files) that modelopt's exporter reads as the 'pretrained' model."""
    from megatron_rence.weights.convert import TOKENIZER_FILES, copy_side_files
    from megatron_rence.weights.hf_config import to_hf_config

    source_config = json.loads((side / "config.json").read_text()) if side and (side / "config.json").is_file() else {}
    hf_config = to_hf_config(replace(model_cfg, dtype=out_dtype), vocab_size, source_config.get("eos_token_id"),
                             source_config.get("pad_token_id"))
    if "bos_token_id" in source_config:
        hf_config.bos_token_id = source_config["bos_token_id"]
    hf_config.save_pretrained(src)
    if side is not None:
        copy_side_files(side, src, TOKENIZER_FILES)


def export_quantized(ckpt: str | os.PathLike, out_dir: str | os.PathLike, quant: str = "fp8",
                     recipe: Optional[str] = None, calib_prompts: int = 16, dtype: Optional[str] = None,
                     allow_unverified: bool = False) -> Path:
    """A Megatron checkpoint -> a modelopt-quantized HF checkpoint in `out_dir` (see the module docstring)."""
    from megatron_rence.weights.convert import DTYPES, find_model_config

    check_quant(quant)
    model_cfg, vocab_size, side = find_model_config(ckpt, recipe)
    out_dtype = dtype or model_cfg.dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"--dtype {out_dtype!r}: expected one of {', '.join(DTYPES)}")
    prompts = calibration_prompts(find_recipe(ckpt, recipe), calib_prompts)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory (the quantized export writes a new one)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _quantize_and_export(ckpt, tmp, quant, model_cfg, vocab_size, side, out_dtype, prompts, allow_unverified)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _quantize_and_export(ckpt, tmp: Path, quant: str, model_cfg: ModelConfig, vocab_size: int,
                         side: Optional[Path], out_dtype: str, prompts: list[list[int]],
                         allow_unverified: bool = False) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_mcore_gpt_to_hf

    from megatron_rence.megatron import checkpoint, parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.weights.convert import DTYPES

    owns_world = not torch.distributed.is_initialized()
    parallel.initialize(ParallelConfig(), seed=0)
    try:
        padded = build_model(model_cfg, ParallelConfig(), vocab_size)[0]
        checkpoint.load(checkpoint.resolve(ckpt), [padded], allow_unverified=allow_unverified)
        model = unpadded_copy(padded, model_cfg, vocab_size).eval()
        del padded
        device = next(model.parameters()).device

        def forward_loop(m) -> None:
            with torch.no_grad():
                for ids in prompts:
                    tokens = torch.tensor([ids], device=device)
                    m(tokens, torch.arange(len(ids), device=device)[None], None)

        model = mtq.quantize(model, getattr(mtq, QUANT_FORMATS[quant]), forward_loop)
        source = tmp / ".source"
        write_source_dir(source, model_cfg, vocab_size, out_dtype, side)
        export_mcore_gpt_to_hf(model, str(source), dtype=DTYPES[out_dtype], export_dir=str(tmp))
        shutil.rmtree(source)
    finally:
        parallel.destroy(process_group=owns_world)
    written = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]["quant_algo"]
    if written != QUANT_ALGO[quant]:
        raise RuntimeError(f"modelopt wrote quant_algo={written!r} for --quant {quant} (expected {QUANT_ALGO[quant]})")
