"""build_model: Llama / Qwen2 / Qwen3 variants give the logits of the transformers model with the same weights.

The Megatron -> HF weight layout here is a small test-side mapping (the product's mapping lives in
weights/mapping); it encodes docs/design.md's layout facts: QKV interleaved per query group, fc1 = [gate; up].
"""
import dataclasses
import sys
import types
from pathlib import Path
from typing import Optional

import pytest
import torch
import transformers

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.megatron.model import build_model, padded_vocab_size, transformer_config
from tests.megatron_state import single_rank

VOCAB = 90
COMMON = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
              max_position_embeddings=64, make_vocab_size_divisible_by=16, dtype="fp32")


@pytest.fixture(scope="module")
def single_process():
    with single_rank(seed=3) as state:
        yield state


def _hf_model(arch: str, cfg: ModelConfig):
    kwargs = dict(vocab_size=VOCAB, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_query_groups, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_epsilon,
                  max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings)
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": cfg.rotary_base, "factor": cfg.rope_scaling_factor,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    config_cls, model_cls = classes[arch]
    return model_cls(config_cls(rope_parameters=rope, **kwargs)).eval()


def _to_hf(mg: dict, cfg: ModelConfig) -> dict:
    hd, groups = cfg.head_dim, cfg.num_query_groups
    per_group = cfg.num_attention_heads // groups
    out = {"model.embed_tokens.weight": mg["embedding.word_embeddings.weight"][:VOCAB],
           "model.norm.weight": mg["decoder.final_layernorm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = mg["output_layer.weight"][:VOCAB]
    for i in range(cfg.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = mg[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = mg[src + "pre_mlp_layernorm.weight"]
        for kind in ("weight", "bias") if cfg.add_qkv_bias else ("weight",):
            qkv = mg[src + f"self_attention.linear_qkv.{kind}"]
            qkv = qkv.view(groups, per_group + 2, hd, *qkv.shape[1:])
            out[dst + f"self_attn.q_proj.{kind}"] = qkv[:, :per_group].reshape(-1, *qkv.shape[3:])
            out[dst + f"self_attn.k_proj.{kind}"] = qkv[:, per_group].reshape(-1, *qkv.shape[3:])
            out[dst + f"self_attn.v_proj.{kind}"] = qkv[:, per_group + 1].reshape(-1, *qkv.shape[3:])
        if cfg.qk_layernorm:
            out[dst + "self_attn.q_norm.weight"] = mg[src + "self_attention.q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = mg[src + "self_attention.k_layernorm.weight"]
        out[dst + "self_attn.o_proj.weight"] = mg[src + "self_attention.linear_proj.weight"]
        gate, up = mg[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = mg[src + "mlp.linear_fc2.weight"]
    return out


VARIANTS = {
    "llama3.1": ("llama", ModelConfig(arch="llama", rotary_base=10000.0, rope_scaling=True, **COMMON)),
    "qwen2.5": ("qwen2", ModelConfig(arch="qwen2", rotary_base=1e6, add_qkv_bias=True, norm_epsilon=1e-6,
                                     tie_word_embeddings=True, **COMMON)),
    "qwen3": ("qwen3", ModelConfig(arch="qwen3", rotary_base=1e6, qk_layernorm=True, kv_channels=32,
                                   norm_epsilon=1e-6, tie_word_embeddings=True, **COMMON)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(single_process, variant):
    arch, cfg = VARIANTS[variant]
    model = build_model(cfg, ParallelConfig(), VOCAB)[0].eval()
    mg = {k: v.detach() for k, v in model.state_dict().items() if "_extra_state" not in k}
    hf = _hf_model(arch, cfg)
    missing, unexpected = hf.load_state_dict(_to_hf(mg, cfg), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        ours = model(tokens, positions, None)[..., :VOCAB]
        theirs = hf(input_ids=tokens).logits
    assert ours.abs().max() > 0.1  # not a trivially zero output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if cfg.rope_scaling:  # Llama-3.1 frequency scaling: the same inverse frequencies as transformers
        hf_inv = hf.model.rotary_emb.inv_freq
        torch.testing.assert_close(model.rotary_pos_emb.inv_freq.float(), hf_inv.float(), rtol=1e-6, atol=0)
        assert not torch.allclose(hf_inv, 1.0 / cfg.rotary_base ** (torch.arange(0, 16, 2) / 16))


def test_parameter_layout(single_process):
    _, cfg = VARIANTS["qwen3"]
    names = {n: tuple(p.shape) for n, p in build_model(cfg, ParallelConfig(), VOCAB)[0].named_parameters()}
    assert "output_layer.weight" not in names  # tied
    assert names["embedding.word_embeddings.weight"] == (96, 64)  # 90 padded to a multiple of 16
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 32, 64)
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"] == (32,)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 96, 64)


def test_padded_vocab_size_and_config_errors():
    assert padded_vocab_size(100, 8, 1) == 104 and padded_vocab_size(100, 8, 2) == 112
    assert padded_vocab_size(128, 128, 1) == 128
    cfg = ModelConfig(dtype="bf16", fp8="delayed", **{k: v for k, v in COMMON.items() if k != "dtype"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="model.fp8"):
            transformer_config(cfg, ParallelConfig(), use_cuda=False)
        # context parallelism runs on CPU through LocalCoreAttention (tests/distributed/test_packing_parallel.py)
        assert transformer_config(VARIANTS["llama3.1"][1], ParallelConfig(cp=2), use_cuda=False).context_parallel_size == 2
    with pytest.raises(ValueError, match="model.vocab_size"):
        build_model(VARIANTS["llama3.1"][1], ParallelConfig(), 0)


def test_cpu_config_takes_the_model_dtype_without_fusions():
    cfg = transformer_config(VARIANTS["llama3.1"][1], ParallelConfig(recompute="full", recompute_num_layers=2),
                             use_cuda=False)
    assert cfg.params_dtype == torch.float32 and not cfg.bf16 and cfg.use_cpu_initialization
    bf16 = transformer_config(dataclasses.replace(VARIANTS["llama3.1"][1], dtype="bf16"), ParallelConfig(),
                              use_cuda=False)
    assert bf16.params_dtype == torch.bfloat16 and bf16.bf16 and bf16.pipeline_dtype == torch.bfloat16
    assert not cfg.gradient_accumulation_fusion and not cfg.masked_softmax_fusion
    assert cfg.recompute_granularity == "full" and cfg.recompute_num_layers == 2
    assert cfg.gated_linear_unit and cfg.normalization == "RMSNorm" and not cfg.add_bias_linear


def fake_te(monkeypatch, version: str, public: Optional[dict] = None, legacy: Optional[dict] = None) -> None:
    """Stand-in Transformer Engine modules (the real one needs CUDA): `public` = {name: (ok, reason)} for the
    TE >= 2.8 `transformer_engine.pytorch.is_*_available`, `legacy` the same for `pytorch.fp8.check_*`."""
    te = types.ModuleType("transformer_engine")
    te.__version__ = version
    te_pt = types.ModuleType("transformer_engine.pytorch")
    for name, answer in (public or {}).items():
        setattr(te_pt, name, lambda return_reason=False, answer=answer: answer)
    te_fp8 = types.ModuleType("transformer_engine.pytorch.fp8")
    for name, answer in (legacy or {}).items():
        setattr(te_fp8, name, lambda answer=answer: answer)
    te.pytorch, te_pt.fp8 = te_pt, te_fp8
    for name, module in (("transformer_engine", te), ("transformer_engine.pytorch", te_pt),
                         ("transformer_engine.pytorch.fp8", te_fp8)):
        monkeypatch.setitem(sys.modules, name, module)
    # TE >= 1.4 has fused RoPE, which megatron binds at import (rope_utils) and the config turns on with TE
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb_thd", lambda *args, **kwargs: None)


@pytest.mark.parametrize("recipe, fp8", [("delayed", "hybrid"), ("tensorwise", "hybrid"), ("blockwise", "e4m3")])
def test_fp8_recipes_are_megatron_recipes(recipe, fp8, monkeypatch):
    """The GPU config for each model.fp8 value is one megatron-core accepts."""
    from megatron.core.enums import Fp8Recipe
    from megatron_rence.megatron import model as model_module

    fake_te(monkeypatch, "2.9.0+abc", public={"is_fp8_available": (True, ""),
                                              "is_fp8_block_scaling_available": (True, "")})
    monkeypatch.setattr(model_module, "te_import_error", lambda: None)
    cfg = ModelConfig(dtype="bf16", fp8=recipe, **{k: v for k, v in COMMON.items() if k != "dtype"})
    config = transformer_config(cfg, ParallelConfig(), use_cuda=True)
    assert config.fp8 == fp8 and Fp8Recipe(config.fp8_recipe) == Fp8Recipe(recipe)
    assert config.bf16 and config.params_dtype == torch.bfloat16
    monkeypatch.setattr(model_module, "te_import_error", lambda: "ImportError: no module named transformer_engine")
    with pytest.raises(ValueError, match=r"Transformer Engine does not import .*\(ImportError: no module named"):
        transformer_config(cfg, ParallelConfig(), use_cuda=True)
    with pytest.raises(ValueError, match=f"model.fp8='{recipe}' needs Transformer Engine: set model.transformer_impl"):
        transformer_config(dataclasses.replace(cfg, transformer_impl="local"), ParallelConfig(), use_cuda=True)


def test_fp8_support_is_checked_when_the_model_is_built(monkeypatch):
    from megatron_rence.megatron import model as model_module
    from megatron_rence.megatron.model import fp8_unsupported

    fake_te(monkeypatch, "2.2.0+git", legacy={"check_fp8_support": (True, "")})
    assert fp8_unsupported("delayed") is None and fp8_unsupported("tensorwise") is None
    assert fp8_unsupported("blockwise") == "needs Transformer Engine >= 2.3.0.dev0, installed 2.2.0+git"
    fake_te(monkeypatch, "2.3.0.dev0+nv", legacy={"check_fp8_support": (True, ""),
                                                  "check_fp8_block_scaling_support": (False, "CUDA < 12.9")})
    assert fp8_unsupported("delayed") is None
    assert fp8_unsupported("blockwise") == "this GPU / CUDA cannot run it (CUDA < 12.9)"
    fake_te(monkeypatch, "2.9.0", public={"is_fp8_available": (False, "Device compute capability 8.9 or higher "
                                                                     "required for FP8 execution."),
                                          "is_fp8_block_scaling_available": (False, "sm90 only")})
    assert "compute capability 8.9" in fp8_unsupported("tensorwise")
    monkeypatch.setattr(model_module, "te_import_error", lambda: None)
    cfg = ModelConfig(dtype="bf16", fp8="blockwise", **{k: v for k, v in COMMON.items() if k != "dtype"})
    with pytest.raises(ValueError, match=r"model.fp8='blockwise': this GPU / CUDA cannot run it \(sm90 only\)"):
        transformer_config(cfg, ParallelConfig(), use_cuda=True)


def test_local_norm_takes_the_params_dtype():
    """A GPU without TE builds the local spec in bf16: its norms too (megatron's own modules follow
    params_dtype; torch.nn.RMSNorm would default to fp32)."""
    from megatron_rence.megatron.model import LocalRMSNorm

    norm = LocalRMSNorm(types.SimpleNamespace(params_dtype=torch.bfloat16, sequence_parallel=True), 8, eps=1e-6)
    assert norm.weight.dtype == torch.bfloat16 and norm.weight.sequence_parallel and norm.eps == 1e-6


# ---- issue 24 item 8: on CUDA a Transformer Engine that does not import is an error, not a silent local spec
class _BrokenTE:
    """A meta-path finder under which `import transformer_engine...` fails as on a GPU node without a usable TE
    (megatron-core 0.16.1's own guards catch ModuleNotFoundError and carry on without TE, so this is the
    failure that used to pass silently). SIMULATED: this machine has neither CUDA nor TE."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "transformer_engine":
            raise ModuleNotFoundError(f"No module named {name!r} (simulated)", name=name)
        return None


@pytest.fixture
def broken_te(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BrokenTE(), *sys.meta_path])


def test_broken_te_on_cuda_is_an_error_naming_the_exception(single_process, broken_te):
    """use_cuda=True stands in for a CUDA machine (simulated); the layer spec is where a GPU run picks TE."""
    from megatron_rence.config import ConfigError
    from megatron_rence.megatron.model import layer_spec, te_import_error

    assert te_import_error() == "ModuleNotFoundError: No module named 'transformer_engine' (simulated)"
    cfg = ModelConfig(**COMMON)
    assert cfg.transformer_impl == "transformer_engine"  # the default: a GPU run uses TE or says why it cannot
    config = transformer_config(cfg, ParallelConfig(), use_cuda=False)  # only its layer count is read here
    with pytest.raises(ConfigError, match=r"model\.transformer_impl=transformer_engine: Transformer Engine does not "
                                          r"import on this CUDA machine \(ModuleNotFoundError: No module named "
                                          r"'transformer_engine' \(simulated\)\).*set model\.transformer_impl=local"):
        layer_spec(cfg, config, use_cuda=True, vp_stage=None)
    # asked for explicitly, the local spec is built without touching TE; without CUDA it always is
    local = layer_spec(dataclasses.replace(cfg, transformer_impl="local"), config, use_cuda=True, vp_stage=None)
    assert len(local.layer_specs) == COMMON["num_layers"]
    assert type(layer_spec(cfg, config, use_cuda=False, vp_stage=None)) is type(local)


def test_transformer_impl_recipe_key(tmp_path):
    from megatron_rence.config import ConfigError
    from megatron_rence.recipe import load_recipe

    repo = Path(__file__).resolve().parents[2]
    assert load_recipe(repo / "recipes/rence_8b.yaml").model.transformer_impl == "transformer_engine"
    for cpu_recipe in ("demo_cpu.yaml", "smollm2_cpu.yaml"):  # they ask for the local spec explicitly
        assert load_recipe(repo / "recipes" / cpu_recipe).model.transformer_impl == "local"
    with pytest.raises(ConfigError, match=r"model\.transformer_impl"):
        load_recipe(repo / "recipes/demo_cpu.yaml", ["model.transformer_impl=te"])
    with pytest.raises(ConfigError, match=r"model\.fp8: .*needs model\.transformer_impl=transformer_engine"):
        load_recipe(repo / "recipes/rence_8b.yaml", ["model.fp8=delayed", "model.transformer_impl=local"])


def test_gpu_fusions_follow_what_imports():
    """On a GPU with Transformer Engine: fused RoPE (no per-layer cu_seqlens .tolist() in the THD path) and fused
    wgrad accumulation when megatron's extension for its own output layer imports too; without TE, neither."""
    from megatron_rence.megatron.model import gpu_fusions, local_thd_offsets_on_host

    assert gpu_fusions(te=True, grad_accum_extension=True) == dict(apply_rope_fusion=True,
                                                                   gradient_accumulation_fusion=True)
    assert gpu_fusions(te=True, grad_accum_extension=False) == dict(apply_rope_fusion=True,
                                                                    gradient_accumulation_fusion=False)
    assert gpu_fusions(te=False, grad_accum_extension=True) == {}
    assert not local_thd_offsets_on_host(False, ModelConfig())  # CPU: host and device are one
    assert local_thd_offsets_on_host(True, ModelConfig(transformer_impl="local"))  # GPU, local spec
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                            num_query_groups=2), ParallelConfig(), use_cuda=False)
    assert not config.apply_rope_fusion and not config.gradient_accumulation_fusion


def test_gpu_transformer_config_turns_the_fusions_on_with_te(monkeypatch):
    """transformer_config(use_cuda=True) takes gpu_fusions' fields (TE and the extension faked present: the
    config's own checks import TE's fused RoPE: fake_te provides it)."""
    from megatron_rence.megatron import model as model_module

    fake_te(monkeypatch, "2.9.0+abc")
    monkeypatch.setattr(model_module, "te_import_error", lambda: None)
    monkeypatch.setattr(model_module, "grad_accum_extension_available", lambda: True)
    config = transformer_config(ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                                            num_query_groups=2, dtype="bf16"), ParallelConfig(), use_cuda=True)
    assert config.apply_rope_fusion and config.gradient_accumulation_fusion
