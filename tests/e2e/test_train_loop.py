"""Short real runs of the whole loop on CPU: metrics, weight changes, engine == trainer after sync, checkpoints,
SIGTERM to the whole process group + --resume reproducing an uninterrupted run, and a two-process (TP=2) run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
    "model.num_query_groups=2", "rollout.prompts_per_step=4", "rollout.num_samples=4",
    "train.global_batch_size=16", "train.micro_batch_size=8", "logging.progress_bar=false",
    "logging.tensorboard=false", "reward.num_workers=1", "data.synthetic.max_value=2", "rollout.max_new_tokens=2",
]


def _env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train(run_dir: Path, *overrides: str, resume: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY,
           f"train.run_dir={run_dir}", *overrides] + (["--resume"] if resume else [])
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_few_steps_write_metrics_checkpoint_and_keep_engine_in_sync(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "train.num_steps=3", "checkpoint.every=2", "train.debug_check_sync=true")
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        for key in ("reward/mean", "loss/total", "perf/rollout_s", "perf/train_s", "perf/sync_s",
                    "rollout/response_len_mean", "groups/mixed_frac"):
            assert key in record, key
        # debug_check_sync compares every engine tensor with the trainer's exported weights after each sync
        assert record["sync/max_abs_diff"] == 0.0
        if record["train/skipped"]:
            continue
        # the engine sampled with the weights the trainer had: fp32 log-probs agree (issue: within 1e-4)
        assert record["mismatch/abs_max"] < 1e-4
    assert max(r.get("train/weights_changed", 0.0) for r in records) > 0.0
    assert (run_dir / "config.yaml").is_file()
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest.endswith("0000003") and (ckpts / latest).is_dir()


def test_fp8_rollouts_with_the_engines_old_logprobs(tmp_path):
    """FP8 rollout weights (CPU engine: W8A8 emulation) with the engine's log-probs as the old policy."""
    run_dir = tmp_path / "run"
    _train(run_dir, "train.num_steps=3", "rollout.sglang.fp8_weights=true", "train.old_logprobs=engine",
           "train.debug_check_sync=true")
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["sync/max_abs_diff"] == 0.0 for r in records)  # the engine holds the FP8-rounded weights
    assert not any(key.startswith("mismatch/") for r in records for key in r)  # no trainer pass to compare
    assert max(r.get("train/weights_changed", 0.0) for r in records) > 0.0


def test_every_rence_component_runs_the_loop(tmp_path):
    """The paper recipe's components together on the tiny model: hard negatives (4 + 2 sampled, 4 kept),
    margin, adaptive KL, the easy filter and two optimizer steps per rollout."""
    run_dir = tmp_path / "run"
    _train(run_dir, "train.num_steps=3", "checkpoint.every=0", "objective.hard_negative_samples=2",
           "objective.margin_alpha=1.0", "objective.kl_coef=0.01", "objective.kl_target=0.05",
           "objective.t_easy=0.75", "train.global_batch_size=8")
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rollout/num_sequences"] == 4 * 6 for r in records)  # K + hard_negative_samples sampled
    trained = [r for r in records if not r["train/skipped"]]
    assert trained, "no step had a group with both positives and negatives"
    for r in trained:
        assert 1 <= r["train/optimizer_steps"] <= 2 and r["train/num_sequences"] <= 8  # whole groups of K=4
    assert len({r["objective/kl_coef"] for r in records}) > 1  # the adaptive KL coefficient moved


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry))
    return members


def _wait_for_steps(metrics_file: Path, n: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)


def _assert_group_gone(pgid: int) -> None:
    deadline = time.time() + 60
    while _group_members(pgid) and time.time() < deadline:
        time.sleep(0.2)
    assert _group_members(pgid) == [], "processes of the run outlived it"


def test_sigterm_to_the_process_group_then_resume_matches_uninterrupted_run(tmp_path):
    """As Slurm / `kill -TERM -- -PGID` do: every process of the run (trainer, reward worker, checkpoint writer
    workers) gets the signal; the save must still work (it failed with BrokenPipeError when megatron's writer
    Manager process died first), land at the last logged step, and leave no process behind."""
    steps = 40  # enough that SIGTERM, sent once step 3 is logged, lands mid-run
    full = tmp_path / "full"
    kl = "objective.kl_coef=0.05"  # a reference model: after the resume it must still be the starting policy
    _train(full, f"train.num_steps={steps}", "checkpoint.every=0", kl)
    reference = {r["step"]: r for r in _metrics(full)}

    cut = tmp_path / "cut"
    # checkpoint.every=1: the writer has run (and left whatever helpers it keeps) before the signal
    cmd = [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY, f"train.run_dir={cut}",
           f"train.num_steps={steps}", "checkpoint.every=1", "checkpoint.keep_last=1", kl]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for_steps(cut / "metrics.jsonl", 3, proc)
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    stopped_at = len(_metrics(cut))
    assert 3 <= stopped_at < steps, out[-2000:]
    assert f"checkpoint written at step {stopped_at}" in out
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"
    _assert_group_gone(proc.pid)

    _train(cut, f"train.num_steps={steps}", "checkpoint.every=0", kl, resume=True)
    resumed = {r["step"]: r for r in _metrics(cut)}
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        for key in ("loss/total", "objective/kl", "reward/mean", "rollout/response_len_mean"):
            assert (key in resumed[step]) == (key in reference[step]), (step, key)  # kl: absent on skipped steps
            if key in reference[step]:
                assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert any(r.get("objective/kl", 0.0) > 0 for r in resumed.values())


def test_two_processes_tp2_run_the_loop(tmp_path):
    run_dir = tmp_path / "tp2"
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
           "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY, f"train.run_dir={run_dir}",
           "train.num_steps=2", "parallel.tp=2", "checkpoint.every=0", "train.debug_check_sync=true"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["sync/max_abs_diff"] == 0.0 for r in records)
