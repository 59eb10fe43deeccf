"""What a stop signal does to the step in flight (train.on_stop), `perf/stop_to_checkpoint_s`, `stops.jsonl` and
`--stopped-exit`, on the real CPU trainer (one process). To land the signal at a known point, a small driver
wraps `phases.rollout_phase` (or `train.setup`) and sends the signal to its own process from there; the
trainer is otherwise unchanged.
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import TINY, _env, _metrics  # noqa: E402

import subprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
STEPS = 5
DRIVER = """
import os, signal, sys
import megatron_rence.phases as phases
import megatron_rence.train as train
where, at = os.environ["SIGNAL_WHERE"], int(os.environ["SIGNAL_AT"])
calls = [0]
def after(fn):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGUSR1)  # the time-limit warning, as srun forwards it
        return out
    return wrapped
if where == "rollout":
    phases.rollout_phase = after(phases.rollout_phase)
elif where == "setup":
    train.setup = after(train.setup)
sys.exit(train.main(sys.argv[1:], program=True))
"""
KEYS = ("loss/total", "reward/mean", "rollout/response_len_mean", "train/grad_norm")


def _run(run_dir: Path, *overrides: str, where: str = "none", at: int = 0, resume: bool = False):
    cmd = [sys.executable, "-c", DRIVER, "recipes/demo_cpu.yaml", *TINY, f"train.run_dir={run_dir}",
           f"train.num_steps={STEPS}", "checkpoint.every=0", "logging.plot=false", "eval.every=0",
           *overrides, "--stopped-exit", "75"] + (["--resume"] if resume else [])
    env = dict(_env(), SIGNAL_WHERE=where, SIGNAL_AT=str(at), PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _ok(proc, status=0):
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]


def _stops(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "stops.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stop") / "reference"
    _ok(_run(run_dir))
    records = {r["step"]: r for r in _metrics(run_dir)}
    assert sorted(records) == list(range(1, STEPS + 1))
    assert not (run_dir / "stops.jsonl").exists()
    return records


def _resume_and_compare(run_dir: Path, reference: dict, *overrides: str) -> None:
    _ok(_run(run_dir, *overrides, resume=True))
    resumed = _metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # every step once
    for r in resumed:
        for key in KEYS:  # a step without a mixed group has no gradient norm, in both runs
            assert (key in r) == (key in reference[r["step"]]), (r["step"], key)
            if key in r:
                assert r[key] == pytest.approx(reference[r["step"]][key], rel=1e-5, abs=1e-6), (r["step"], key)


def test_abandon_step_checkpoints_the_last_completed_step_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, "train.on_stop=abandon_step", where="rollout", at=3)  # signal during step 3's rollout
    _ok(proc, 75)
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2]  # step 3 was dropped, not logged
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    (stop,) = _stops(run_dir)
    assert stop["step"] == 2 and stop["how"] == "step 3 abandoned (train.on_stop)" and stop["signal"] == 10
    assert 0 < stop["perf/stop_to_checkpoint_s"] < 300
    assert "SIGUSR1: step 3 abandoned (train.on_stop); checkpoint written at step 2" in proc.stdout
    _resume_and_compare(run_dir, reference, "train.on_stop=abandon_step")


def test_finish_step_checkpoints_the_step_in_flight_and_logs_the_stop_time(tmp_path, reference):
    run_dir = tmp_path / "run"
    _ok(_run(run_dir, where="rollout", at=3), 75)  # the same signal: step 3 is finished, then checkpointed
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"
    assert 0 < records[-1]["perf/stop_to_checkpoint_s"] < 300
    assert all("perf/stop_to_checkpoint_s" not in r for r in records[:-1])
    (stop,) = _stops(run_dir)
    assert stop["step"] == 3 and stop["how"] == "step finished"
    assert stop["perf/stop_to_checkpoint_s"] == pytest.approx(records[-1]["perf/stop_to_checkpoint_s"], abs=1e-3)
    _resume_and_compare(run_dir, reference)


def test_signal_during_setup_stops_before_the_first_step(tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, where="setup", at=1)
    _ok(proc, 75)  # a stop, not a finished run: the launcher requeues after a warning
    assert not (run_dir / "metrics.jsonl").exists() or not _metrics(run_dir)
    (stop,) = _stops(run_dir)
    assert stop["step"] == 0 and stop["how"] == "before the first step"
