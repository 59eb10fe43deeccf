"""megatron-core GPTModel chunks from the recipe's model section (Llama-3, Qwen2.5, Qwen3).

On GPU the Transformer Engine layer spec (FP8 through TE when ``model.fp8`` is set; a TE that does not import
is an error unless ``model.transformer_impl=local`` asks for megatron's local spec); without CUDA the local
layer spec with the settings ``cpu_compat`` needs. Parameters are in ``model.dtype`` on both (bf16 on CPU runs
megatron's mixed-precision optimizer with fp32 main params, as on a GPU). One chunk per virtual pipeline stage.
The returned chunks are bare ``GPTModel`` modules: DDP wrapping belongs to the optimizer (``step.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_rence.config import ConfigError, ModelConfig, ParallelConfig
from megatron_rence.megatron import cpu_compat

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# model.fp8 -> (TransformerConfig.fp8, TransformerConfig.fp8_recipe)
FP8_RECIPES = {"delayed": ("hybrid", "delayed"), "tensorwise": ("hybrid", "tensorwise"),
               "blockwise": ("e4m3", "blockwise")}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's vocabulary padding: the next multiple of divisible_by * tp (rows past vocab_size are unused)."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _recompute_fields(parallel_cfg: ParallelConfig) -> dict:
    if parallel_cfg.recompute == "none":
        return {}
    if parallel_cfg.recompute == "selective":
        return dict(recompute_granularity="selective")
    return dict(recompute_granularity="full", recompute_method="uniform",
                recompute_num_layers=parallel_cfg.recompute_num_layers)


def transformer_config(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, use_cuda: bool):
    """The TransformerConfig for a Llama/Qwen-style decoder (RMSNorm, SwiGLU, RoPE, GQA, no linear biases)."""
    from megatron.core.transformer import TransformerConfig

    m, p = model_cfg, parallel_cfg
    dtype = _DTYPES[m.dtype]
    fields = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim, normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias, qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp, context_parallel_size=p.cp,
        sequence_parallel=p.sequence_parallel, pipeline_dtype=dtype,
        # padded microbatches of one call share the schedule's seq_length; packed ones differ and the trainer
        # turns on variable_seq_lengths for them (on gloo, cpu_compat routes its shape handshake per direction)
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True, **_recompute_fields(p),
    )
    if use_cuda and m.fp8 is not None:
        if not use_transformer_engine(m, use_cuda):
            raise ConfigError(f"model.fp8={m.fp8!r} needs Transformer Engine: set "
                              f"model.transformer_impl=transformer_engine")
        problem = fp8_unsupported(m.fp8)
        if problem:
            raise ValueError(f"model.fp8={m.fp8!r}: {problem}")
        fields["fp8"], fields["fp8_recipe"] = FP8_RECIPES[m.fp8]
    if not use_cuda:
        if m.fp8 is not None:
            raise ValueError(f"model.fp8={m.fp8!r} needs CUDA and Transformer Engine; unset it for CPU runs")
        fields.update(cpu_compat.cpu_config_overrides())
    else:
        fields.update(gpu_fusions(use_transformer_engine(m, use_cuda), grad_accum_extension_available()))
    return TransformerConfig(**fields)


def gpu_fusions(te: bool, grad_accum_extension: bool) -> dict:
    """TransformerConfig fusions on a GPU (megatron-core 0.16.1 leaves both off by default):
    - apply_rope_fusion with Transformer Engine: TE's fused RoPE kernel, also for packed THD batches (the
      unfused THD path, rope_utils._apply_rotary_pos_emb_thd, calls ``.tolist()`` on cu_seqlens in every
      layer: a host synchronisation per layer per microbatch);
    - gradient_accumulation_fusion with Transformer Engine (its linears accumulate wgrad into main_grad) and
      the fused_weight_gradient_mlp_cuda extension, which megatron's own ColumnParallelLinear (the output
      layer) requires when the flag is on (tensor_parallel/layers.py raises without it).
    Without TE (the local spec) neither is available; there packed batches keep their cu_seqlens on the host
    (``local_thd_offsets_on_host``), so the unfused RoPE and LocalCoreAttention read them without a sync."""
    if not te:
        return {}
    return dict(apply_rope_fusion=True, gradient_accumulation_fusion=grad_accum_extension)


def grad_accum_extension_available() -> bool:
    """Whether megatron's fused wgrad accumulation extension imports (APEX's fused_weight_gradient_mlp_cuda)."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def local_thd_offsets_on_host(use_cuda: bool, model_cfg: ModelConfig) -> bool:
    """Packed batches' cu_seqlens stay on the host for the local spec on a GPU (no TE: nothing reads them on
    the device), so the per-layer ``.tolist()`` calls of the unfused THD RoPE and LocalCoreAttention are free."""
    return use_cuda and not use_transformer_engine(model_cfg, use_cuda)


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor; unlike megatron's WrappedTorchNorm it allows sequence
    parallelism, marking its weight `sequence_parallel` so finalize_model_grads sums its grad over TP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)  # bf16 on a GPU without TE
        self.weight.sequence_parallel = config.sequence_parallel


def te_import_error() -> Optional[str]:
    """None if Transformer Engine imports (it needs CUDA; the Dockerfile builds it), else the exception that
    stopped it, as "Type: message"."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a TE built for another CUDA / torch (OSError, RuntimeError ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def use_transformer_engine(model_cfg: ModelConfig, use_cuda: bool) -> bool:
    """Whether the model is built from Transformer Engine layers: on CUDA, unless `model.transformer_impl` is
    "local". A TE that does not import there is a ConfigError naming the exception, never a silent fall back
    to the local spec (slower, other parameter names). Without CUDA: False (TE needs CUDA)."""
    if not use_cuda or model_cfg.transformer_impl == "local":
        return False
    problem = te_import_error()
    if problem is not None:
        raise ConfigError(f"model.transformer_impl=transformer_engine: Transformer Engine does not import on this "
                          f"CUDA machine ({problem}); fix its installation (the Dockerfile builds it) or set "
                          f"model.transformer_impl=local for megatron's local layer spec (no FP8, slower, "
                          f"other parameter names)")
    return True


def available_transformer_impl(use_cuda: bool) -> str:
    """For benchmarks without a recipe: "transformer_engine" where it can run (CUDA and TE imports), else "local".
    Recipes name `model.transformer_impl` instead; benchmarks print what they used next to their figures."""
    return "transformer_engine" if use_cuda and te_import_error() is None else "local"


# model.fp8 -> the first Transformer Engine release megatron-core builds that recipe with (fp8_utils.get_fp8_recipe)
FP8_MIN_TE = {"delayed": "2.1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0"}


def fp8_unsupported(recipe: str) -> Optional[str]:
    """Why the installed Transformer Engine or this GPU cannot train with `recipe` (None if it can): checked
    when the model is built, instead of failing at the first forward."""
    import transformer_engine
    import transformer_engine.pytorch as te
    from packaging.version import Version

    version = Version(transformer_engine.__version__.split("+")[0])
    if version < Version(FP8_MIN_TE[recipe]):
        return f"needs Transformer Engine >= {FP8_MIN_TE[recipe]}, installed {transformer_engine.__version__}"
    public = "is_fp8_block_scaling_available" if recipe == "blockwise" else "is_fp8_available"
    legacy = "check_fp8_block_scaling_support" if recipe == "blockwise" else "check_fp8_support"
    if hasattr(te, public):  # TE >= 2.8
        ok, reason = getattr(te, public)(return_reason=True)
    else:
        from transformer_engine.pytorch import fp8 as te_fp8

        ok, reason = getattr(te_fp8, legacy)()
    return None if ok else f"this GPU / CUDA cannot run it ({reason})"


def layer_spec(model_cfg: ModelConfig, config, use_cuda: bool, vp_stage):
    """TE layer spec on GPU (needed for FP8); otherwise (CPU, or model.transformer_impl=local on a GPU: no FP8)
    megatron's local spec with LocalRMSNorm and our LocalCoreAttention (packed THD batches and context
    parallelism, which megatron's local DotProductAttention rejects)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_rence.megatron.attention import LocalCoreAttention

    if use_transformer_engine(model_cfg, use_cuda):
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model_cfg.qk_layernorm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=model_cfg.qk_layernorm, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    qk_norm = LocalRMSNorm if model_cfg.qk_layernorm else attention.submodules.q_layernorm
    attention = dataclasses.replace(attention, submodules=dataclasses.replace(
        attention.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm, core_attention=LocalCoreAttention))
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm, self_attention=attention))
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=LocalRMSNorm)


def build_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, vocab_size: int) -> list:
    """One GPTModel per virtual pipeline stage of this rank; `parallel.initialize` must have run.

    `vocab_size` is the tokenizer's; the embedding is padded (see `padded_vocab_size`), so log-probs must
    mask the rows past `vocab_size` (`logprobs.vocab_parallel_logprobs(..., vocab_size=)`).
    Outputs are vocab-parallel logits [B, S, V_padded / tp] on the last stage, hidden states elsewhere.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if vocab_size < 1:
        raise ValueError(f"model.vocab_size: need the tokenizer's vocabulary size, got {vocab_size}")
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call megatron_rence.megatron.parallel.initialize before build_model")
    use_cuda = torch.cuda.is_available()
    config = transformer_config(model_cfg, parallel_cfg, use_cuda)
    padded = padded_vocab_size(vocab_size, model_cfg.make_vocab_size_divisible_by, parallel_cfg.tp)
    chunks = []
    for vp_stage in range(parallel_cfg.vpp or 1):
        vp = vp_stage if parallel_cfg.vpp else None
        spec = layer_spec(model_cfg, config, use_cuda, vp)
        model = GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=padded,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True, share_embeddings_and_output_weights=model_cfg.tie_word_embeddings,
            position_embedding_type="rope", rotary_base=int(model_cfg.rotary_base),
            rope_scaling=model_cfg.rope_scaling, rope_scaling_factor=model_cfg.rope_scaling_factor,
            vp_stage=vp,
        )
        if use_cuda:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks
