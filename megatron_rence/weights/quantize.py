"""FP8 rollout weights: block-wise float8_e4m3fn quantisation of the HF-named linear weights in a sync bucket.

The trainer keeps its BF16/FP32 master weights; only the stream to the engine is quantised. The format
is the one SGLang's `fp8` block quantisation loads (and the official `*-FP8` Qwen3 / DeepSeek checkpoints
use): for each linear weight `W [out, in]`, `...proj.weight` holds float8_e4m3fn values and
`...proj.weight_scale_inv` the float32 scale of each 128 x 128 block, with `W ~= q * scale_inv` blockwise.
The engine's model directory declares `quantization_config = {quant_method: fp8, weight_block_size:
[128, 128]}` (rollout/sglang_engine.write_model_dir). Embeddings, the output layer, norms and biases stay
in the training dtype, as in those checkpoints.
"""
from __future__ import annotations

import re

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def is_quantized_linear(name: str) -> bool:
    return _LINEAR.match(name) is not None


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(out/block), ceil(in/block)]) with |q| <= 448."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    w = weight.float()
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w
    blocks = padded.view(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3))  # [br, bc]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(br * block, bc * block)[:rows, :cols].contiguous(), scale_inv


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """float32 weight from (q, scale_inv): each block times its scale."""
    rows, cols = q.shape
    scale = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q.float() * scale


def quantize_bucket(bucket: list[tuple[str, torch.Tensor]], block: int = BLOCK) -> list[tuple[str, torch.Tensor]]:
    """The bucket with every linear weight replaced by its FP8 values and `weight_scale_inv` tensor."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in bucket:
        if is_quantized_linear(name):
            q, scale_inv = quantize_block_fp8(tensor, block)
            out += [(name, q), (name[: -len("weight")] + "weight_scale_inv", scale_inv)]
        else:
            out.append((name, tensor))
    return out


def dequantize_bucket(bucket: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `quantize_bucket` (for engines without FP8 kernels, e.g. the CPU engine): plain weights."""
    scales = {name[: -len("_scale_inv")]: t for name, t in bucket if name.endswith(".weight_scale_inv")}
    out = []
    for name, tensor in bucket:
        if name.endswith(".weight_scale_inv"):
            continue
        if name in scales:
            if tensor.dtype != FP8:
                raise ValueError(f"{name}: has a weight_scale_inv but dtype {tensor.dtype}, not {FP8}")
            tensor = dequantize_block_fp8(tensor, scales[name])
        out.append((name, tensor.to(dtype)))
    return out
