"""A run's checkpoint exported with `tools/export_megatron_to_hf.py --quant fp8` (modelopt, in the main .venv) loads
into SGLang 0.5.5.post3's real LlamaForCausalLM with SGLang's own modelopt FP8 method (ModelOptFp8Config /
ModelOptFp8LinearMethod): SGLang's ModelConfig reads `modelopt` (FP8) from the checkpoint, `load_weights` sets
every parameter (all are NaN-filled first), the fused qkv_proj / gate_up_proj hold the exported FP8 values and
per-shard scales, and the unquantized embedding / norms / lm_head are the exported ones.

Not done here (CUDA only): `process_weights_after_loading` (its requantization to the max shard scale calls
sgl_kernel's `sgl_per_tensor_quant_fp8`, even though modelopt's q/k/v and gate/up scales are already equal)
and the FP8 GEMM (`apply_fp8_linear`). The transformers side of the check (dequantized forward close to the
source) is tests/unit/test_quantized_export.py.
"""
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.sglang

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"  # has nvidia-modelopt (tools/setup_env.sh)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> Path:
    from megatron_rence.recipe import load_recipe, save_resolved
    from megatron_rence.weights.convert import import_hf
    from tests.hf_models import save_chat_model
    from tests.megatron_state import cpu_compat_restored

    root = tmp_path_factory.mktemp("sglang_fp8")
    hf = save_chat_model(root / "hf", "llama", seed=4, tie_word_embeddings=False, jitter=0.05)
    cfg = load_recipe(REPO / "recipes/demo_cpu.yaml", [f"model.hf_path={hf}", f"model.tokenizer={hf}",
                                                       f"train.run_dir={root / 'run'}", "data.synthetic.num_problems=64"])
    save_resolved(cfg, root / "run")
    with cpu_compat_restored():
        import_hf(hf, root / "run" / "checkpoints")
    if not MAIN_PYTHON.is_file():
        raise RuntimeError(f"{MAIN_PYTHON} is missing: run `make env` (the export needs the main venv's modelopt)")
    proc = subprocess.run([str(MAIN_PYTHON), "tools/export_megatron_to_hf.py", str(root / "run" / "checkpoints"),
                           str(root / "fp8"), "--quant", "fp8", "--calib-prompts", "4", "--dtype", "bf16"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return root / "fp8"


@pytest.fixture(scope="module")
def sglang_world(fp8_dir):
    from sglang.srt.distributed import parallel_state as sps
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    from megatron_rence.megatron.parallel import free_port

    set_global_server_args_for_scheduler(ServerArgs(model_path=str(fp8_dir), device="cpu"))
    sps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
    sps.initialize_model_parallel(1)
    yield
    sps.destroy_model_parallel()
    sps.destroy_distributed_environment()


def _exported(path: Path) -> dict[str, torch.Tensor]:
    files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    return {k: v for f in sorted(files) for k, v in load_file(path / f).items()}


def test_sglang_loads_every_parameter_with_its_modelopt_fp8_method(fp8_dir, sglang_world):
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.quantization import get_quantization_config
    from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp8Config, ModelOptFp8LinearMethod
    from sglang.srt.model_loader.loader import _initialize_model
    from sglang.srt.model_loader.utils import set_default_torch_dtype

    model_config = ModelConfig(str(fp8_dir), dtype="bfloat16")
    assert model_config.quantization == "modelopt"  # config.json's quant_method; SGLang maps it to FP8 or FP4
    assert get_quantization_config(model_config.quantization) is ModelOptFp8Config
    with set_default_torch_dtype(torch.bfloat16), torch.device("cpu"):
        model = _initialize_model(model_config, LoadConfig())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn.qkv_proj.quant_method, ModelOptFp8LinearMethod)
    assert isinstance(mlp.gate_up_proj.quant_method, ModelOptFp8LinearMethod)
    assert isinstance(attn.qkv_proj.quant_method.quant_config, ModelOptFp8Config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))  # float8_e4m3fn has a NaN too: a parameter left unset shows
    exported = _exported(fp8_dir)
    model.load_weights(iter(exported.items()))
    unset = [n for n, p in params.items() if torch.isnan(p.float()).any()]
    assert unset == [], unset
    _check_values(model, exported)


def _check_values(model, exported: dict[str, torch.Tensor]) -> None:
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        for fused, parts in ((layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                             (layer.self_attn.o_proj, ("self_attn.o_proj",)),
                             (layer.mlp.down_proj, ("mlp.down_proj",))):
            assert fused.weight.dtype == torch.float8_e4m3fn
            want = torch.cat([exported[p + s + ".weight"] for s in parts]).view(torch.uint8)
            assert torch.equal(fused.weight.view(torch.uint8), want), p + parts[0]
            assert torch.equal(fused.weight_scale, torch.stack([exported[p + s + ".weight_scale"].reshape(())
                                                                 for s in parts])), p + parts[0]
            assert torch.equal(fused.input_scale, torch.cat([exported[p + s + ".input_scale"].reshape(1)
                                                              for s in parts])), p + parts[0]
        assert torch.equal(layer.input_layernorm.weight.float(), exported[p + "input_layernorm.weight"].float())
    vocab = exported["model.embed_tokens.weight"].shape[0]  # SGLang pads its vocab-parallel tables (to 64 here)
    for table, name in ((model.model.embed_tokens.weight, "model.embed_tokens.weight"),
                        (model.lm_head.weight, "lm_head.weight")):
        assert torch.equal(table[:vocab], exported[name]) and not table[vocab:].any(), name
