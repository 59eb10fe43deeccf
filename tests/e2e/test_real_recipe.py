"""recipes/smollm2_cpu.yaml end to end with a tiny stand-in model (the real one is ~540 MB and needs a download):
model.hf_path / model.tokenizer point at a tiny tied Llama with a chat template; everything else is the
recipe's own (word problems generated in code, the held-out benchmark, fallbacks, threads, eval)."""
import json
import subprocess
import sys
from pathlib import Path

from tests.hf_models import save_chat_model

REPO = Path(__file__).resolve().parents[2]


def make_tiny_chat_model(out: Path) -> Path:
    """A tiny random Llama with tied embeddings (like SmolLM2) and the synthetic tokenizer's chat template."""
    return save_chat_model(out, "llama", seed=3, max_position_embeddings=512)


def test_real_recipe_runs_two_steps_with_a_tiny_model(tmp_path):
    hf_dir = make_tiny_chat_model(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/smollm2_cpu.yaml",
           f"model.hf_path={hf_dir}", f"model.tokenizer={hf_dir}", f"train.run_dir={run_dir}",
           "train.num_steps=2", "rollout.prompts_per_step=2", "rollout.num_samples=2", "rollout.max_new_tokens=6",
           "train.global_batch_size=4", "train.micro_batch_size=2", "eval.every=2", "eval.max_new_tokens=4",
           "data.synthetic.num_heldout=3", "eval.num_samples=2", "data.synthetic.num_problems=50",
           "train.num_threads=1", "logging.tensorboard=false", "logging.progress_bar=false", "logging.plot=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"start: weights from {hf_dir} (hf)" in proc.stdout
    assert "torch threads per process: 1 (train.num_threads=1)" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.0 <= r["reward/fallback_frac"] <= 1.0 for r in records)
    assert records[1]["eval/heldout/num_problems"] == 3 and "eval/heldout/fallback_frac" in records[1]
    assert "eval at start: eval/avg@2=" in proc.stdout  # eval.at_start: the starting weights, before step 1
    assert (run_dir / "eval" / "step_000000" / "results.md").is_file()
    table = (run_dir / "eval" / "step_000002" / "results.md").read_text()
    assert "| heldout | 3 |" in table and "fallback" in table
    resolved = (run_dir / "config.yaml").read_text()
    assert "hidden_size: 32" in resolved and "kind: word_problems" in resolved
    assert (run_dir / "checkpoints" / "latest").is_file()


def test_max_minutes_stops_with_a_checkpoint(tmp_path):
    """A budget already spent when the first step ends: one step, a checkpoint, a clean exit."""
    hf_dir = make_tiny_chat_model(tmp_path / "tiny")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/smollm2_cpu.yaml",
           f"model.hf_path={hf_dir}", f"model.tokenizer={hf_dir}", f"train.run_dir={run_dir}",
           "train.num_steps=50", "train.max_minutes=0.0001", "rollout.prompts_per_step=2", "rollout.num_samples=2",
           "rollout.max_new_tokens=4", "train.global_batch_size=4", "train.micro_batch_size=2", "eval.every=0",
           "data.synthetic.num_problems=20", "logging.tensorboard=false", "logging.progress_bar=false",
           "logging.plot=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "train.max_minutes=0.0001 reached: checkpoint written at step 1" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith("1")
