"""FP8 weights: block-wise float8_e4m3fn quantisation of the HF-named linear weights in a sync bucket (rollout
weights and `export --quant fp8_block`), and reading modelopt per-tensor FP8 checkpoints back without FP8 kernels.

The trainer keeps its BF16/FP32 master weights; only the stream to the engine is quantised. The format
is the one SGLang's `fp8` block quantisation loads (and the official `*-FP8` Qwen3 / DeepSeek checkpoints
use): for each linear weight `W [out, in]`, `...proj.weight` holds float8_e4m3fn values and
`...proj.weight_scale_inv` the float32 scale of each 128 x 128 block, with `W ~= q * scale_inv` blockwise.
The engine's model directory declares `quantization_config = {quant_method: fp8, weight_block_size:
[128, 128]}` (rollout/sglang_engine.write_model_dir). Embeddings, the output layer, norms and biases stay
in the training dtype, as in those checkpoints.

SGLang serves such a layer as a W8A8 GEMM: each activation row is quantised on the fly per 128-column group
(scale = group amax / 448) and the products are rescaled blockwise in fp32, which equals
``dequant(x) @ dequant(W).T``. `emulate_w8a8` reproduces that on an engine without FP8 kernels (the CPU
engine) so the train/engine mismatch it reports includes the activation rounding too.
"""
from __future__ import annotations

import re

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
BLOCK = 128
CHUNK_BYTES = 64 * 2**20  # fp32 working set of one quantisation step
# config.json `quantization_config` of such a checkpoint (SGLang / transformers / vLLM `fp8` method)
BLOCK_FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$")


def is_quantized_linear(name: str) -> bool:
    return _LINEAR.match(name) is not None


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK,
                       chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(out/block), ceil(in/block)]) with |q| <= 448.

    Works through runs of whole row blocks of at most about `chunk_bytes` in fp32, so the fp32 temporaries
    are bounded by the chunk, not the tensor (the result does not depend on the chunk size)."""
    if weight.dim() != 2:
        raise ValueError(f"block FP8 needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    q = torch.empty(rows, cols, dtype=FP8, device=weight.device)
    scale_inv = torch.empty(br, bc, dtype=torch.float32, device=weight.device)
    step = max(1, chunk_bytes // (bc * block * block * 4)) * block  # rows per chunk: whole row blocks
    for r0 in range(0, rows, step):
        part = weight[r0:r0 + step]
        nr, nbr = part.shape[0], -(-part.shape[0] // block)
        padded = torch.zeros(nbr * block, bc * block, dtype=torch.float32, device=weight.device)
        padded[:nr, :cols] = part
        blocks = padded.view(nbr, block, bc, block)
        amax = blocks.abs().amax(dim=(1, 3))  # [nbr, bc]
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        blocks.div_(scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
        q[r0:r0 + nr] = padded[:nr, :cols].to(FP8)
        scale_inv[r0 // block:r0 // block + nbr] = scale
    return q, scale_inv


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


def fake_quantize_activations(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """x rounded as SGLang's dynamic per-token-group FP8 quantisation rounds it, then dequantised: each run of
    `group` values along the last dim gets scale = max(amax, 1e-10) / 448. (SGLang needs the last dim to be
    a multiple of `group`; a shorter last group is allowed here, for models below one block.)"""
    width = x.shape[-1]
    groups = -(-width // group)
    flat = torch.nn.functional.pad(x.float().reshape(-1, width), (0, groups * group - width))
    flat = flat.view(-1, groups, group)
    scale = flat.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    q = (flat / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    back = (q.float() * scale).view(-1, groups * group)[:, :width]
    return back.reshape(x.shape).to(x.dtype)


def emulate_w8a8(model: torch.nn.Module, group: int = BLOCK) -> list:
    """Quantise the inputs of the model's block-FP8 linear layers (the HF names `is_quantized_linear`
    matches) with `fake_quantize_activations`; returns the hook handles (``handle.remove()`` undoes it)."""
    def hook(module, args):
        return (fake_quantize_activations(args[0], group),) + tuple(args[1:])

    return [module.register_forward_pre_hook(hook) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and is_quantized_linear(f"{name}.weight")]


# ---- modelopt FP8 checkpoints (tools/export_megatron_to_hf.py --quant fp8) read back without FP8 kernels ----

def dequantize_modelopt_fp8(tensors: dict[str, torch.Tensor],
                            dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A modelopt FP8 (quant_algo FP8) state dict -> (plain weights `weight_fp8 * weight_scale` in `dtype`,
    {linear module name: static input_scale}). transformers ignores quant_method=modelopt and would load the
    FP8 values unscaled, so this is how a transformers forward of such a checkpoint must be built."""
    plain, input_scales = {}, {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".input_scale")):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and f"{module}.weight_scale" in tensors:
            if tensor.dtype != FP8:
                raise ValueError(f"{name}: has a weight_scale but dtype {tensor.dtype}, not {FP8}")
            scale = tensors[f"{module}.weight_scale"]
            if scale.numel() != 1:
                raise ValueError(f"{module}.weight_scale has shape {tuple(scale.shape)}: only per-tensor FP8 is read")
            tensor = tensor.float() * scale.float()
            if f"{module}.input_scale" in tensors:
                input_scales[module] = float(tensors[f"{module}.input_scale"].float().max())
        plain[name] = tensor.to(dtype)
    return plain, input_scales


def static_fp8_inputs(model: torch.nn.Module, input_scales: dict[str, float]) -> list:
    """Round each listed linear's input as a static per-tensor FP8 GEMM does (x / input_scale, clamped to
    +-448, cast to float8_e4m3fn, times input_scale); returns the hook handles."""
    modules = dict(model.named_modules())
    missing = sorted(set(input_scales) - set(modules))
    if missing:
        raise ValueError(f"the model has no module {missing[0]!r} (of {len(missing)} with an input_scale)")

    def hook_for(scale: float):
        def hook(module, args):
            x = args[0]
            q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
            return ((q.float() * scale).to(x.dtype),) + tuple(args[1:])
        return hook

    return [modules[name].register_forward_pre_hook(hook_for(scale)) for name, scale in input_scales.items()]
