"""Run state is never silently lost or poisoned (short real runs on CPU): a corrupt latest checkpoint and a torn
metrics line survive a --resume (the start line names the checkpoint loaded, the eval summary has each step
once); a fresh launch into a finished run dir is refused; train.overwrite replaces the run (metrics and eval
summary included) and refuses a checkpoint.load inside it; a diverging run stops with a message instead of a
sampler traceback and leaves only finite checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

from megatron_rence.metrics import read_metrics
from tests.e2e.test_train_loop import REPO, TINY, _env, _metrics


def _run(run_dir: Path, *overrides: str, resume: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY,
           f"train.run_dir={run_dir}", *overrides] + (["--resume"] if resume else [])
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)


EVAL = ["eval.every=1", "eval.benchmarks=[{name: heldout, format: synthetic}]", "data.synthetic.num_heldout=1",
        "eval.num_samples=2", "eval.max_new_tokens=2"]


def _summary_steps(run_dir: Path) -> list:
    return [json.loads(line)["step"] for line in (run_dir / "eval" / "summary.jsonl").read_text().splitlines()]


def test_corrupt_latest_and_torn_metrics_then_resume_and_a_refused_fresh_launch(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, "train.num_steps=2", "checkpoint.every=1", "checkpoint.keep_last=3", *EVAL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: 5000 prompts; dropped 0 longer than data.max_prompt_len" in proc.stdout
    ckpts = run_dir / "checkpoints"
    distcp = sorted((ckpts / "iter_0000002").glob("*.distcp"))[0]
    distcp.write_bytes(distcp.read_bytes()[:100])  # a truncated shard in the latest checkpoint
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/me')  # a torn last line

    refused = _run(run_dir, "train.num_steps=3")  # forgot --resume
    assert refused.returncode == 2 and f"run dir {run_dir} already holds a run" in refused.stderr, refused.stderr
    assert (ckpts / "iter_0000001").is_dir() and [r["step"] for r in read_metrics(run_dir)] == [1, 2]

    proc = _run(run_dir, "train.num_steps=3", "checkpoint.every=1", *EVAL, resume=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(distcp) in proc.stdout and "loading" in proc.stdout and "dropping a torn last line" in proc.stdout
    assert f"resumed from {ckpts / 'iter_0000001'} at step 1" in proc.stdout
    assert f"start: weights from {ckpts / 'iter_0000001'} (checkpoint, resumed)" in proc.stdout
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]  # step 2 was run again, from step 1's state
    assert _summary_steps(run_dir) == [1, 2, 3]  # and evaluated again: one line per step
    assert (ckpts / "latest").read_text().strip() == "iter_0000003"
    assert (ckpts / "iter_0000002.corrupt").is_dir()

    named = ckpts / "iter_0000003"  # the report's case: overwrite a run and load one of its checkpoints
    refused = _run(run_dir, "train.num_steps=1", "train.overwrite=true", f"checkpoint.load={named}")
    assert refused.returncode == 2 and "checkpoint.load" in refused.stderr, refused.stderr[-3000:]
    assert (named / "manifest.json").is_file() and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]

    proc = _run(run_dir, "train.num_steps=1", "checkpoint.every=1", "train.overwrite=true", *EVAL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "set aside" in proc.stdout and "removed the previous run" in proc.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["iter_0000001", "latest"]  # the new run's only
    assert [r["step"] for r in _metrics(run_dir)] == [1] and _summary_steps(run_dir) == [1]
    assert not (run_dir / "previous_run").exists() and not (run_dir / "overwrite.json").exists()


def test_diverging_run_stops_with_a_message_and_keeps_finite_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, "optim.lr=1e30", "train.num_steps=4", "checkpoint.every=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error: rollout: the policy's logits hold NaN / inf" in proc.stderr, proc.stderr[-3000:]
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "iter_0000001" and (run_dir / "checkpoints" / latest / "manifest.json").is_file()
    assert not (run_dir / ".lock").exists()
