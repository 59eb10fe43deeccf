"""A run whose recipe names `model.hf_path` starts from that checkpoint's weights (not a random init): the
trainer's log-probs equal transformers' on the same sequences, and a short CLI run from it trains and saves."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_rence.recipe import load_recipe
from tests.hf_models import save_chat_model

REPO = Path(__file__).resolve().parents[2]
ARCH = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
        "model.num_query_groups=2"]  # the recipe's own values: config.json replaces them (tested in test_config)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("hf"), "qwen2", seed=5, hidden_size=48, intermediate_size=80,
                           extra_vocab=3, jitter=0.05)


def test_setup_loads_the_hf_weights(hf_dir, tmp_path):
    from megatron_rence import train
    from tests.megatron_state import cpu_compat_restored

    cfg = load_recipe(REPO / "recipes/demo_cpu.yaml",
                      [f"model.hf_path={hf_dir}", f"model.tokenizer={hf_dir}", f"train.run_dir={tmp_path}",
                       "logging.tensorboard=false", "logging.progress_bar=false", "reward.num_workers=1"])
    assert cfg.model.arch == "qwen2" and cfg.model.hidden_size == 48
    with cpu_compat_restored():
        run = train.setup(cfg, resume=False)
        try:
            g = torch.Generator().manual_seed(0)
            seqs = [(torch.randint(1, run.vocab_size, (n,), generator=g).tolist(), 3) for n in (6, 9, 5)]
            got = run.trainer.logprobs(seqs, 1.0)
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            for (tokens, prompt_len), lp in zip(seqs, got):
                with torch.no_grad():
                    logits = hf(torch.tensor([tokens])).logits[0].float()
                want = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(tokens[1:]).unsqueeze(1))[:, 0]
                torch.testing.assert_close(lp, want[prompt_len - 1:], atol=1e-5, rtol=0)
        finally:
            train.close(run)


def test_cli_run_from_hf_path(hf_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", f"model.hf_path={hf_dir}",
           f"model.tokenizer={hf_dir}", f"train.run_dir={run_dir}", "train.num_steps=2", "checkpoint.every=0",
           "rollout.prompts_per_step=4", "rollout.num_samples=4", "train.global_batch_size=16",
           "train.micro_batch_size=8", "logging.tensorboard=false", "logging.progress_bar=false",
           "reward.num_workers=1", "train.debug_check_sync=true"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["sync/max_abs_diff"] == 0.0 for r in records)
    resolved = (run_dir / "config.yaml").read_text()
    assert "hidden_size: 48" in resolved and "arch: qwen2" in resolved
    assert (run_dir / "checkpoints" / "latest").is_file()


@pytest.fixture(scope="module")
def hf_bf16_dir(tmp_path_factory):
    """A tiny Llama checkpoint saved in bf16 (so the bf16 trainer holds it exactly) with the synthetic tokenizer."""
    return save_chat_model(tmp_path_factory.mktemp("hf_bf16"), "llama", seed=7, tie_word_embeddings=False,
                           jitter=0.05, dtype=torch.bfloat16)


def test_bf16_run_keeps_the_hf_weights_with_lr_0(hf_bf16_dir, tmp_path):
    """Mixed precision on CPU: bf16 parameters, megatron's Float16Optimizer with fp32 main params. With lr=0 two
    optimizer steps must leave the HF weights exactly as loaded; main params copied before the HF load (the
    optimizer is built first) would write the random init back at the first step."""
    from safetensors.torch import load_file

    run_dir, export = tmp_path / "run", tmp_path / "export"
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", f"model.hf_path={hf_bf16_dir}",
           f"model.tokenizer={hf_bf16_dir}", "model.dtype=bf16", "optim.lr=0.0", f"train.run_dir={run_dir}",
           "train.num_steps=2", "checkpoint.every=0", "rollout.prompts_per_step=4", "rollout.num_samples=4",
           "train.global_batch_size=16", "train.micro_batch_size=8", "logging.tensorboard=false",
           "logging.progress_bar=false", "logging.plot=false", "reward.num_workers=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"start: weights from {hf_bf16_dir} (hf) params=bf16 main_params=fp32" in proc.stdout, proc.stdout[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["train/optimizer_steps"] for r in records] == [1.0, 1.0]  # both steps really ran the optimizer
    exported = subprocess.run([sys.executable, "tools/export_megatron_to_hf.py", str(run_dir / "checkpoints"),
                               str(export)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    want, got = load_file(hf_bf16_dir / "model.safetensors"), load_file(export / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name
