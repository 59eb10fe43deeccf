"""Slurm launch scripts: syntax, what they pass to the trainer, rendezvous, container flags, signal forwarding, requeue.

Slurm cannot run here, so these tests put fakes of `srun` and `scontrol` (and a fake trainer behind $PYTHON)
first on PATH: the fake srun runs its command once as task 0 of 1 (exec, so signals sent to "srun" reach
the trainer), the fake scontrol answers `show hostnames` and records `requeue`. The planner step runs the
real `python -m megatron_rence.plan`.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
WRAPPERS = {"rence_70b.sbatch": ("recipes/rence_70b.yaml", 8, 600),  # recipe, nodes, --signal lead (s)
            "rence_8b.sbatch": ("recipes/rence_8b.yaml", 1, 300), "rence_1p5b.sbatch": ("recipes/rence_1p5b.yaml", 1, 300)}

FAKE_SRUN = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/srun.args"
out=""
while [[ $# -gt 0 && $1 == -* ]]; do
    case $1 in --output=*) out=${1#--output=} ;; esac
    shift
done
export SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0
if [[ -n $out ]]; then exec "$@" >> "$out" 2>&1; else exec "$@"; fi
"""
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-017\\ngpu-node-018\\n'; exit 0; fi
echo "$*" >> "$FAKE_LOG/scontrol.args"
"""
# The fake trainer records argv and the rendezvous environment; "sleep" mode waits for a signal.
FAKE_PYTHON = """#!{python}
import json, os, signal, subprocess, sys, time
log = os.environ["FAKE_LOG"]
if sys.argv[1:3] == ["-m", "megatron_rence.plan"]:
    sys.exit(subprocess.call([{python!r}] + sys.argv[1:]))
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", "SRUN_CPUS_PER_TASK"]
with open(os.path.join(log, "train.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
mode = os.environ.get("FAKE_MODE", "exit")
def on_term(signum, frame):
    open(os.path.join(log, "checkpointed"), "w").write(signal.Signals(signum).name)
    sys.exit(0)
if mode == "sleep":
    signal.signal(signal.SIGTERM, on_term)
elif mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, on_term)
if mode != "exit":
    open(os.path.join(log, "started"), "w").close()
    time.sleep(60)
print("trainer done")
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("python", FAKE_PYTHON.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # may be left by other tests
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in rendezvous}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), PYTHON=str(bin_dir / "python"),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-node-[017-018]", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_NUM_NODES="8", SLURM_NTASKS_PER_NODE="8", RUN_ROOT=str(tmp_path / "runs"))
    env.pop("CONTAINER_IMAGE", None)
    return env, log, tmp_path


def test_every_script_parses():
    assert len(SCRIPTS) >= 4, SCRIPTS
    for script in SCRIPTS:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_scripts_forward_overrides_and_call_the_trainer():
    generic = (REPO / "slurm" / "rence.sbatch").read_text()
    assert '-m megatron_rence.train "$@"' in generic
    assert '"$RECIPE" "train.run_dir=$RUN_DIR" "$@" --resume' in generic
    assert "scontrol requeue" in generic and "#SBATCH --requeue" in generic
    assert "pkill" not in generic and "kill -9" not in generic
    for name, (recipe, nodes, lead) in WRAPPERS.items():
        text = (REPO / "slurm" / name).read_text()
        assert f"#SBATCH --nodes={nodes}" in text and f"#SBATCH --signal=B:USR1@{lead}" in text
        assert f'exec bash "$REPO_DIR/slurm/rence.sbatch" "${{RECIPE:-{recipe}}}" "$@"' in text
        assert (REPO / recipe).is_file()


def test_launch_passes_recipe_overrides_and_rendezvous(fake_slurm):
    env, log, tmp = fake_slurm
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch"), "optim.lr=5e-7", "eval.every=0"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import json

    record = json.loads((log / "train.json").read_text())
    run_dir = tmp / "runs" / "rence_70b"
    assert record["argv"] == ["-m", "megatron_rence.train", "recipes/rence_70b.yaml", f"train.run_dir={run_dir}",
                              "optim.lr=5e-7", "eval.every=0", "--resume"]
    assert record["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8",
                             "MASTER_ADDR": "gpu-node-017", "MASTER_PORT": str(20000 + 4242),
                             "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0",
                             "SRUN_CPUS_PER_TASK": "16"}
    srun_calls = (log / "srun.args").read_text().splitlines()
    assert len(srun_calls) == 2  # the planner check, then the training step
    assert "megatron_rence.plan recipes/rence_70b.yaml" in srun_calls[0] and "--nodes 8 --gpus-per-node 8" in srun_calls[0]
    assert "--cpus-per-task 16 --grace-s 540" in srun_calls[0]
    assert "--cpus-per-task=16" in srun_calls[1]  # not inherited by srun since Slurm 22.05
    assert "ok        fits" in proc.stdout  # the real planner accepted the 70B layout on 8 x 8
    assert "checkpoint 987.8 GB: ~198 s to write at 5 GB/s" in proc.stdout
    assert "warning   the preemption" not in proc.stdout
    assert "--container-image" not in srun_calls[1]
    assert (run_dir / "logs" / "train-4242-0.log").read_text().strip() == "trainer done"
    assert not (log / "scontrol.args").exists()  # finished normally: no requeue


def test_planner_rejection_stops_the_launch(fake_slurm):
    env, log, _ = fake_slurm
    env["SLURM_JOB_NUM_NODES"] = "1"  # the 70B recipe on one node: the planner says it does not fit
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "planner rejected" in proc.stdout and not (log / "train.json").exists()


def test_container_flags(fake_slurm):
    env, log, tmp = fake_slurm
    env.update(CONTAINER_IMAGE="/images/rence.sqsh", PLAN="0", DATA_DIR=str(tmp))
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence.sbatch"), "recipes/rence_8b.yaml"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    call = (log / "srun.args").read_text().splitlines()[-1]
    assert "--container-image=/images/rence.sqsh" in call
    assert f"--container-mounts={REPO}:{REPO},{tmp}/runs:{tmp}/runs,{tmp}:{tmp}" in call
    assert f"--container-workdir={REPO}" in call


def _start_and_signal(env, log, sig):
    proc = subprocess.Popen(["bash", str(REPO / "slurm" / "rence_8b.sbatch")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (log / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_usr1_forwards_sigterm_then_requeues(fake_slurm):
    env, log, _ = fake_slurm
    env.update(FAKE_MODE="sleep", PLAN="0", SLURM_JOB_NUM_NODES="1")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert (log / "checkpointed").read_text() == "SIGTERM", out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out
    assert rc == 0, out


def test_sigterm_forwards_without_requeue(fake_slurm):
    env, log, _ = fake_slurm
    env.update(FAKE_MODE="sleep", PLAN="0", SLURM_JOB_NUM_NODES="1")
    rc, out = _start_and_signal(env, log, signal.SIGTERM)
    assert (log / "checkpointed").read_text() == "SIGTERM", out
    assert not (log / "scontrol.args").exists(), out


def test_grace_expiry_ends_the_step(fake_slurm):
    env, log, _ = fake_slurm  # a trainer that ignores SIGTERM gets srun's "two SIGINTs" after GRACE_S
    env.update(FAKE_MODE="ignore_term", PLAN="0", SLURM_JOB_NUM_NODES="1", GRACE_S="1")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert (log / "checkpointed").read_text() == "SIGINT", out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out


def test_requeue_limit(fake_slurm):
    env, log, _ = fake_slurm
    env.update(FAKE_MODE="sleep", PLAN="0", SLURM_JOB_NUM_NODES="1", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert "not requeueing" in out and not (log / "scontrol.args").exists()


def test_cpus_per_task_too_few_for_engine_and_reward_workers(fake_slurm):
    env, log, _ = fake_slurm
    env["SLURM_CPUS_PER_TASK"] = "8"  # 70B: 1 trainer + max(tp 8 + 1 engine processes, 15 reward workers) = 16
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "planner rejected" in proc.stdout, proc.stdout + proc.stderr
    assert "--cpus-per-task 8 < 16 CPUs an engine owner needs" in proc.stdout + proc.stderr
    assert not (log / "train.json").exists()


def test_node_without_cpus_for_every_task_stops_the_launch(fake_slurm):
    env, log, _ = fake_slurm
    env.update(SLURM_CPUS_ON_NODE="64", SLURM_CPUS_PER_TASK="16")  # 8 tasks x 16 CPUs do not fit 64
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "64 CPUs for 8 tasks x 16 CPUs" in proc.stderr
    assert not (log / "srun.args").exists()


def test_planner_warns_when_the_checkpoint_outlasts_the_grace(fake_slurm):
    env, log, _ = fake_slurm
    env["FS_GBPS"] = "1"  # ~988 s for the 70B checkpoint > GRACE_S=540
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning   the preemption checkpoint needs ~988 s at 1 GB/s but the trainer gets 540 s" in proc.stdout
