"""Our weight stream (megatron-core trainer -> weights/sync.py -> HF-named buckets, as pushed every step) loaded
by SGLang 0.5.5.post3's REAL model classes through their own `load_weights`: Llama untied, Qwen2 tied with
QKV bias, plain and block FP8, from a trainer at TP 1 and at TP 2 (whose shards our sync all-gathers). Every
SGLang parameter is compared bit for bit with what the HF checkpoint the trainer started from says it must
hold (fused qkv_proj / gate_up_proj, FP8 values and their scale_inv), and none is left unset."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rollout.sglang_engine import DTYPES, write_model_dir
from megatron_rence.weights.hf_config import model_config_from_hf, to_hf_config
from megatron_rence.weights.portable import make_portable
from megatron_rence.weights.quantize import quantize_block_fp8
from tests.distributed import launcher
from tests.sglang.engine_setup import free_port

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parents[2]
# whole 128x128 FP8 blocks: q rows 4 x 32, k / v rows 4 x 32, gate / up rows 256, hidden 128
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=64, rope_theta=50000.0)
ARCHS = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True))}


def hf_checkpoint(arch: str, out: Path, vocab: int) -> dict[str, torch.Tensor]:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(len(arch))
    model = model_cls(config_cls(vocab_size=vocab, architectures=[model_cls.__name__], **SHAPE, **extra))
    with torch.no_grad():  # every tensor distinct (norms off 1, biases off 0): a swapped or skipped one shows
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    make_portable(out)
    return {k: v.clone() for k, v in model.state_dict().items()}


def streams_from_trainer(sources: list[tuple[str, bool]]) -> list[bytes]:
    """Launcher rank body: for each (HF dir, fp8), a megatron model at TP = WORLD_SIZE started from the HF dir,
    streamed to rank 0 as the trainer pushes it every step; rank 0 returns each stream torch.save'd (bytes,
    not tensors: the launcher's queue would share tensors by file descriptors, which die with this process)."""
    from megatron_rence.megatron import parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.weights.convert import init_from_hf
    from megatron_rence.weights.sync import iter_hf_buckets

    tp = int(os.environ["WORLD_SIZE"])
    pstate = parallel.initialize(ParallelConfig(tp=tp), seed=0)
    out = []
    for hf_dir, fp8 in sources:
        cfg = ModelConfig(**model_config_from_hf(hf_dir), hf_path=hf_dir, dtype="bf16" if fp8 else "fp32",
                          make_vocab_size_divisible_by=8)
        chunks = build_model(cfg, ParallelConfig(tp=tp), cfg.vocab_size)
        init_from_hf(chunks, cfg, cfg.vocab_size, pstate)
        stream = []
        for bucket in iter_hf_buckets(chunks, cfg, cfg.vocab_size, 64 * 1024, pstate, dst_ranks=(0,), fp8=fp8):
            stream += [(name, t.clone()) for name, t in bucket]
        buffer = io.BytesIO()
        torch.save(stream, buffer)
        out.append(buffer.getvalue())
    return out


def _fp8(t: torch.Tensor, fp8: bool) -> list[torch.Tensor]:
    return list(quantize_block_fp8(t)) if fp8 else [t]


def expected_params(hf: dict[str, torch.Tensor], arch: str, fp8: bool) -> dict[str, torch.Tensor]:
    """SGLang's parameter names and contents for an HF state dict (its fused qkv_proj / gate_up_proj); FP8
    runs serve bf16 (the trainer's and SGLang's dtype there), the linear weights block-quantised from it."""
    if fp8:
        hf = {k: v.to(torch.bfloat16) for k, v in hf.items()}
    want = {"model.embed_tokens.weight": hf["model.embed_tokens.weight"], "model.norm.weight": hf["model.norm.weight"]}
    if arch == "llama":
        want["lm_head.weight"] = hf["lm_head.weight"]
    suffixes = ["weight", "weight_scale_inv"] if fp8 else ["weight"]
    for i in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        fused = {"self_attn.qkv_proj": [f"self_attn.{x}_proj" for x in "qkv"],
                 "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
                 "self_attn.o_proj": ["self_attn.o_proj"], "mlp.down_proj": ["mlp.down_proj"]}
        for target, parts in fused.items():
            pieces = [_fp8(hf[p + part + ".weight"], fp8) for part in parts]
            for k, suffix in enumerate(suffixes):
                want[p + target + "." + suffix] = torch.cat([piece[k] for piece in pieces])
        if arch == "qwen2":
            want[p + "self_attn.qkv_proj.bias"] = torch.cat([hf[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want[p + norm + ".weight"] = hf[p + norm + ".weight"]
    return want


def test_our_stream_loads_exactly_into_sglangs_model_classes(tmp_path):
    tokenizer = build_synthetic_tokenizer()
    vocab = len(tokenizer)
    sources, targets = [], []
    for arch in ARCHS:
        hf_dir = tmp_path / f"hf_{arch}"
        hf = hf_checkpoint(arch, hf_dir, vocab)
        for fp8 in (False, True):
            dtype = "bf16" if fp8 else "fp32"
            hf_config = to_hf_config(ModelConfig(**model_config_from_hf(hf_dir), dtype=dtype), vocab)
            model_dir = write_model_dir(hf_config, tokenizer, tmp_path / f"engine_{arch}_{fp8}", fp8=fp8)
            sources.append((str(hf_dir), fp8))
            targets.append((f"{arch} fp8={fp8}", str(model_dir), DTYPES[dtype], expected_params(hf, arch, fp8)))
    cases = []
    for tp in (1, 2):  # TP 2: each tensor is all-gathered from the two trainer ranks' shards
        streams = launcher.run(streams_from_trainer, tp, sources, timeout=900)[0]
        cases += [{"name": f"{name} trainer_tp={tp}", "model_dir": model_dir, "dtype": dtype,
                   "stream": torch.load(io.BytesIO(data)), "expected": expected}
                  for (name, model_dir, dtype, expected), data in zip(targets, streams)]
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sglang_load.py")), str(tmp_path / "cases.pt"),
                           str(free_port())], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == [c["name"] for c in cases]
    for r, case in zip(results, cases):
        assert r["mismatched"] == [] and r["unset"] == [], r
        assert len(r["checked"]) == len(case["expected"]) >= 15
