"""Slurm launch scripts: syntax, what they pass to the trainer, rendezvous, container flags, signal handling, requeue.

These tests put fakes of `srun` and `scontrol` (and a fake trainer behind $PYTHON) first on PATH; the real
cluster tier is tests/slurm/. The fake srun (tests/fake_srun.py) behaves as real srun does towards
its tasks: SIGTERM / SIGHUP / SIGQUIT SIGKILL them, SIGUSR1 / SIGUSR2 are forwarded, a first SIGINT only
prints, a second within a second sends SIGINT then SIGKILL. The fake scontrol answers `show hostnames`,
`show config` (KillWait) and `show job` (Command=, PreemptTime= from $FAKE_PREEMPT_TIME) and records
`requeue`. The planner step runs the real `python -m megatron_rence.plan`.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))
WRAPPERS = {"rence_70b.sbatch": ("recipes/rence_70b.yaml", 8, 780),  # recipe, nodes, --signal lead (s)
            "rence_8b.sbatch": ("recipes/rence_8b.yaml", 1, 300), "rence_1p5b.sbatch": ("recipes/rence_1p5b.yaml", 1, 300)}

FAKE_SRUN = f"""#!/bin/bash
exec {sys.executable} {REPO / 'tests' / 'fake_srun.py'} "$@"
"""  # behaves as real srun
FAKE_SCONTROL = """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu-node-017\\ngpu-node-018\\n'; exit 0; fi
if [[ $1 == show && $2 == config ]]; then echo "KillWait                = 30 sec"; exit 0; fi
if [[ $1 == show && $2 == job ]]; then
    echo "   Command=${FAKE_COMMAND:-none} recipes/x.yaml data.path=/data/slurm/x.jsonl"  # the script, its arguments
    echo "   PreemptEligibleTime=2026-12-05T08:00:00 PreemptTime=${FAKE_PREEMPT_TIME:-None}"
    exit 0
fi
echo "$*" >> "$FAKE_LOG/scontrol.args"
"""
# The fake trainer records argv and the rendezvous environment; "sleep" mode waits for a stop signal
# (SIGTERM / SIGUSR1, as the real one) and exits with --stopped-exit; "ignore_stop" ignores both.
FAKE_PYTHON = """#!{python}
import json, os, signal, subprocess, sys, time
log = os.environ["FAKE_LOG"]
if sys.argv[1:3] == ["-m", "megatron_rence.plan"]:
    time.sleep(float(os.environ.get("FAKE_PLAN_SLEEP", "0")))
    sys.exit(subprocess.call([{python!r}] + sys.argv[1:]))
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", "SRUN_CPUS_PER_TASK"]
with open(os.path.join(log, "train.json"), "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}}}}, f)
stopped = int(sys.argv[sys.argv.index("--stopped-exit") + 1]) if "--stopped-exit" in sys.argv else 0
mode = os.environ.get("FAKE_MODE", "exit")
def on_stop(signum, frame):
    open(os.path.join(log, "checkpointed"), "w").write(signal.Signals(signum).name)
    sys.exit(stopped)
if mode == "sleep":
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, on_stop)
elif mode == "ignore_stop":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
if mode == "late":  # still importing when the warning comes: the handler is installed 2 s later
    open(os.path.join(log, "started"), "w").write(str(os.getpid()))
    time.sleep(2)
    signal.signal(signal.SIGUSR1, on_stop)
if mode != "exit":
    open(os.path.join(log, "started"), "w").write(str(os.getpid()))
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
               SLURM_JOB_NUM_NODES="8", SLURM_NTASKS_PER_NODE="8", RUN_ROOT=str(tmp_path / "runs"),
               FAKE_COMMAND=str(REPO / "slurm" / "rence.sbatch"), FAKE_SRUN_NTASKS="1")
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
    assert 'kill -TERM "$SRUN_PID"' not in generic  # srun answers SIGTERM by SIGKILLing the tasks
    # the traps come before the first srun (the planner's): an early warning must not kill the batch shell
    first_srun = re.search(r"^\s*srun ", generic, re.MULTILINE).start()
    assert generic.index("trap 'on_signal USR1' USR1") < first_srun
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
    record = json.loads((log / "train.json").read_text())
    run_dir = tmp / "runs" / "rence_70b"
    assert record["argv"] == ["-m", "megatron_rence.train", "recipes/rence_70b.yaml", f"train.run_dir={run_dir}",
                              "optim.lr=5e-7", "eval.every=0", "--resume", "--stopped-exit", "75"]
    assert record["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8",
                             "MASTER_ADDR": "gpu-node-017", "MASTER_PORT": str(20000 + 4242),
                             "CUDA_DEVICE_MAX_CONNECTIONS": "1", "NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0",
                             "SRUN_CPUS_PER_TASK": "16"}
    srun_calls = (log / "srun.args").read_text().splitlines()
    assert len(srun_calls) == 2  # the planner check, then the training step
    assert "megatron_rence.plan recipes/rence_70b.yaml" in srun_calls[0] and "--nodes 8 --gpus-per-node 8" in srun_calls[0]
    assert "--cpus-per-task 16 --grace-s 720 --kill-wait-s 30 --rollout-s 300 --train-s 180" in srun_calls[0]
    assert "--cpus-per-task=16" in srun_calls[1]  # not inherited by srun since Slurm 22.05
    assert "ok        fits" in proc.stdout  # the real planner accepted the 70B layout on 8 x 8
    assert "checkpoint 987.8 GB: ~198 s to write at 5 GB/s" in proc.stdout
    assert "the time-limit warning (GRACE_S" not in proc.stdout.split("warning", 1)[-1]  # the lead fits finish_step
    assert "the plain scancel / hard time limit / preemption without grace / scontrol requeue (KillWait) path would " \
           "lose work" in proc.stdout  # 30 s: no 70B checkpoint fits
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


def _start(env, script="rence_8b.sbatch", *args):
    return subprocess.Popen(["bash", str(REPO / "slurm" / script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_started(proc, log):
    deadline = time.time() + 60
    while not (log / "started").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    time.sleep(0.3)
    return int((log / "started").read_text())


def _start_and_signal(env, log, sig):
    proc = _start(env)
    _wait_started(proc, log)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def test_fake_srun_kills_its_tasks_on_sigterm_as_real_srun_does(fake_slurm):
    env, log, tmp = fake_slurm  # why the batch script must never forward SIGTERM to srun
    env.update(FAKE_MODE="sleep", SLURM_PROCID="0")
    proc = subprocess.Popen(["srun", "--output=" + str(tmp / "task.log"), str(Path(env["PYTHON"])), "-m", "x",
                             "--stopped-exit", "75"], env=env)
    _wait_started(proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGKILL
    assert not (log / "checkpointed").exists()


@pytest.fixture
def sleeping(fake_slurm):
    env, log, tmp = fake_slurm
    env.update(FAKE_MODE="sleep", PLAN="0", SLURM_JOB_NUM_NODES="1")
    return env, log, tmp


def test_usr1_warning_forwards_sigusr1_then_requeues(sleeping):
    env, log, _ = sleeping  # --signal=B:USR1@N: the trainer must get a signal it can checkpoint on
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert (log / "checkpointed").read_text() == "SIGUSR1", out
    assert (log / "srun.signals").read_text().split() == ["USR1"], out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out
    assert rc == 0, out


def test_warning_before_the_trainer_has_its_handler_is_not_lost(fake_slurm):
    env, log, _ = fake_slurm  # SIGUSR1's default action would kill a trainer that is still starting up
    env.update(FAKE_MODE="late", PLAN="0", SLURM_JOB_NUM_NODES="1")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert (log / "checkpointed").read_text() == "SIGUSR1", out
    assert (log / "srun.signals").read_text().split()[:2] == ["USR1", "USR1"], out  # sent again after 5 s
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out
    assert rc == 0 and "training step ended with status 75" in out, out


def test_sigterm_to_the_batch_shell_forwards_sigusr1_without_requeue(sleeping):
    env, log, _ = sleeping  # `scancel -b -s TERM`: only the batch shell is signalled
    rc, out = _start_and_signal(env, log, signal.SIGTERM)
    assert (log / "checkpointed").read_text() == "SIGUSR1", out
    assert not (log / "scontrol.args").exists(), out
    assert rc == 0, out


def test_preemption_with_grace_time_requeues(sleeping):
    env, log, _ = sleeping  # GraceTime > 0: SIGTERM to the steps only, PreemptTime set, the batch shell sees nothing
    env["FAKE_PREEMPT_TIME"] = "2026-12-05T09:00:00"
    proc = _start(env)
    os.kill(_wait_started(proc, log), signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert (log / "checkpointed").read_text() == "SIGTERM", out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out
    assert "preempted (grace time): requeueing job 4242" in out and proc.returncode == 0


def test_sigterm_to_the_steps_without_preemption_ends_the_job(sleeping):
    env, log, _ = sleeping  # `scancel -s TERM JOB`: PreemptTime=None, the user stops the run
    proc = _start(env)
    os.kill(_wait_started(proc, log), signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert (log / "checkpointed").read_text() == "SIGTERM", out
    assert not (log / "scontrol.args").exists(), out
    assert proc.returncode == 0, out


def test_finished_run_is_not_requeued_after_a_late_warning(fake_slurm):
    env, log, _ = fake_slurm
    env.update(PLAN="0", SLURM_JOB_NUM_NODES="1", FAKE_PREEMPT_TIME="2026-12-05T09:00:00")
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_8b.sbatch")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not (log / "scontrol.args").exists(), proc.stdout + proc.stderr


def test_warning_during_the_planner_does_not_kill_the_batch_shell(fake_slurm):
    env, log, _ = fake_slurm  # Slurm may send the warning ~60 s early, before the training step starts
    env.update(FAKE_MODE="sleep", SLURM_JOB_NUM_NODES="1", FAKE_PLAN_SLEEP="3")
    proc = _start(env)
    deadline = time.time() + 30
    while not (log / "srun.args").exists():
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "before the training step started" in out and not (log / "train.json").exists(), out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out


def test_grace_expiry_ends_the_step(fake_slurm):
    env, log, _ = fake_slurm  # a trainer that ignores the stop gets srun's "two SIGINTs" after GRACE_S
    env.update(FAKE_MODE="ignore_stop", PLAN="0", SLURM_JOB_NUM_NODES="1", GRACE_S="1")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert (log / "srun.signals").read_text().split() == ["USR1", "INT", "INT"], out
    assert "training step ended with status 137" in out, out
    assert (log / "scontrol.args").read_text().split() == ["requeue", "4242"], out


def test_requeue_limit(sleeping):
    env, log, _ = sleeping
    env.update(SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    rc, out = _start_and_signal(env, log, signal.SIGUSR1)
    assert "not requeueing" in out and not (log / "scontrol.args").exists()


def _spool_copy(tmp, name="rence.sbatch"):
    """sbatch runs a copy of the script from its spool directory, with the submit directory as cwd."""
    spool, elsewhere = tmp / "spool" / "job04242", tmp / "home"
    spool.mkdir(parents=True)
    elsewhere.mkdir()
    (spool / "slurm_script").write_text((REPO / "slurm" / name).read_text())
    return spool / "slurm_script", elsewhere


@pytest.mark.parametrize("name, args", [("rence.sbatch", ["recipes/rence_8b.yaml"]), ("rence_8b.sbatch", [])])
def test_submitted_from_another_directory_finds_the_checkout(fake_slurm, name, args):
    env, log, tmp = fake_slurm
    script, elsewhere = _spool_copy(tmp, name)
    env.update(PLAN="0", SLURM_JOB_NUM_NODES="1", SLURM_SUBMIT_DIR=str(elsewhere),
               FAKE_COMMAND=str(REPO / "slurm" / name))
    proc = subprocess.run(["bash", str(script), *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((log / "train.json").read_text())["argv"][2] == "recipes/rence_8b.yaml"


def test_no_checkout_to_be_found_fails_at_once_saying_how_to_submit(fake_slurm):
    env, log, tmp = fake_slurm
    script, elsewhere = _spool_copy(tmp)
    env.update(PLAN="0", SLURM_SUBMIT_DIR=str(elsewhere), FAKE_COMMAND=str(elsewhere / "rence.sbatch"))
    proc = subprocess.run(["bash", str(script), "recipes/rence_8b.yaml"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "cannot find the megatron-rence checkout" in proc.stderr, proc.stderr
    assert "cd /path/to/megatron-rence && sbatch slurm/rence.sbatch" in proc.stderr
    assert not (log / "srun.args").exists()


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


def test_planner_warns_when_the_stop_outlasts_the_warning_lead(fake_slurm):
    env, log, _ = fake_slurm
    env["FS_GBPS"] = "1"  # ~988 s for the 70B checkpoint + a 480 s step in flight > GRACE_S=720
    proc = subprocess.run(["bash", str(REPO / "slurm" / "rence_70b.sbatch")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("warning   the time-limit warning (GRACE_S, under #SBATCH --signal=B:USR1@<lead>) path would lose work: "
            "train.on_stop=finish_step needs ~1,468 s from the signal to the checkpoint on disk but gets 720 s") \
        in proc.stdout
