"""The time-limit warning of a 2-rank launch through slurm/rence.sbatch: SIGUSR1 to the batch shell (what
`--signal=B:USR1@N` and `scancel -b -s USR1` do), the stop checkpoint at the step the trainers were on, the
requeue, and the requeued launch resuming to an uninterrupted run's metrics.

A FAKE `srun` (tests/fake_srun.py) starts its command once per task with SLURM_PROCID / SLURM_NTASKS /
SLURM_LOCALID set and treats signals as real srun does (USR1 forwarded, TERM -> SIGKILL to the tasks); a
fake `scontrol` answers `show hostnames` with localhost and records `requeue`. tests/slurm/ runs the same
against a real Slurm cluster. The trainers are the real
`python -m megatron_rence.train` on the CPU demo (TP=2 over gloo) with evaluation every 2 steps, which the
two ranks now run as a collective (rank 0 holds the only CPU engine; rank 1 takes part in the gather).
"""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from test_train_loop import TINY, _assert_group_gone, _wait_for_steps  # noqa: E402

FAKE_SRUN = f"""#!/bin/bash
exec {sys.executable} {REPO / 'tests' / 'fake_srun.py'} "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; exit 0; fi
if [[ $1 == show ]]; then exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol.args"
"""
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def launch(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": p, "answer": a}) + "\n" for p, a in
                             (("1+1", "2"), ("2+0", "2"), ("0+1", "1"))))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PYTHON=sys.executable, PLAN="0",
               SLURM_JOB_ID="77", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2", SLURM_CPUS_PER_TASK="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), RUN_ROOT=str(tmp_path / "runs"))
    overrides = [*TINY, "parallel.tp=2", f"train.num_steps={STEPS}", "logging.plot=false", "eval.every=2",
                 f"eval.benchmarks=[{{name: toy, path: {bench}}}]", "eval.num_samples=2", "eval.max_new_tokens=2"]

    def start(run_name: str, *extra: str) -> subprocess.Popen:
        env_run = dict(env, RUN_NAME=run_name, MASTER_PORT=str(_free_port()))
        return subprocess.Popen(["bash", str(REPO / "slurm" / "rence.sbatch"), "recipes/demo_cpu.yaml", *overrides,
                                 *extra], cwd=REPO, env=env_run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    return start, tmp_path / "runs"


def _finish(proc: subprocess.Popen, run_dir: Path) -> str:
    try:
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = "".join(p.read_text()[-3000:] for p in sorted((run_dir / "logs").glob("*")))
    assert proc.returncode == 0, out[-2000:] + logs
    return out + logs


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())}


def tmp_log(runs: Path) -> Path:
    return runs.parent / "log"


def test_time_limit_warning_checkpoints_both_ranks_and_the_requeue_resumes_identically(launch):
    start, runs = launch
    _finish(start("full", "checkpoint.every=0"), runs / "full")
    reference = _metrics(runs / "full")
    assert sorted(reference) == list(range(1, STEPS + 1)) and "eval/toy/avg@2" in reference[2]

    cut = runs / "cut"
    proc = start("cut", "checkpoint.every=1")
    _wait_for_steps(cut / "metrics.jsonl", 3, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # the time-limit warning, to the batch shell only
    out = _finish(proc, cut)
    assert (tmp_log(runs) / "scontrol.args").read_text().split() == ["requeue", "77"], out[-3000:]
    stopped_at = len(_metrics(cut))
    assert 3 <= stopped_at < STEPS, out[-3000:]
    assert (cut / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"
    assert sorted(p.name for p in (cut / "checkpoints" / f"iter_{stopped_at:07d}" / "rng").iterdir()) == \
        ["rank_00000.pt", "rank_00001.pt"]
    _assert_group_gone(proc.pid)

    _finish(start("cut", "checkpoint.every=0"), cut)  # the requeued job: rence.sbatch always passes --resume
    resumed = _metrics(cut)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "reward/mean", "rollout/response_len_mean", "eval/toy/avg@2", "eval/toy/pass@2"):
            assert (key in resumed[step]) == (key in reference[step]), (step, key)
            if key in reference[step]:
                assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)
