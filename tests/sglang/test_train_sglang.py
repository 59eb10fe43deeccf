"""The CPU demo trained on SGLang's real engine: `rence-train recipes/demo_cpu.yaml rollout.engine=sglang` with
the documented CPU settings runs steps, a SIGTERM to the whole process group (Slurm's scancel, `kill -- -PGID`:
the engine's scheduler and detokenizer get it too) ends it with a checkpoint at the last logged step, and
`--resume` continues from there on a new engine. rence-train is a fresh interpreter whose first spawned
processes are the engine's: their stop signals must be blocked (CPython's resource tracker, started inside our
block, used to unblock SIGINT / SIGTERM: SigBlk 0x200, and the group SIGTERM killed the engine)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_rence.lifecycle import STOP_SIGNALS, descendants
from megatron_rence.metrics import read_metrics
from tests.e2e.test_train_loop import REPO, TINY, _assert_group_gone, _env, _wait_for_steps
from tests.sglang.engine_setup import free_port

pytestmark = pytest.mark.sglang

# what README.md documents for rollout.engine=sglang on a CPU machine (train.device=cpu turns on SGLang's
# CPU path, sleep_on_idle and no CUDA graphs; the memory saver is CUDA-only and off there)
CPU_SGLANG = ["rollout.engine=sglang", "rollout.sglang.mem_fraction_static=0.05",
              "rollout.sglang.extra_args.max_total_tokens=8192",
              "rollout.sglang.extra_args.disable_overlap_schedule=true"]


def _cmd(run_dir, *overrides, resume=False):
    return [sys.executable, "-m", "megatron_rence.train", "recipes/demo_cpu.yaml", *TINY, *CPU_SGLANG,
            f"rollout.sglang.base_port={free_port()}", f"train.run_dir={run_dir}", *overrides] + (
        ["--resume"] if resume else [])


def test_demo_on_sglang_group_sigterm_checkpoints_then_resumes(tmp_path):
    run_dir, steps = tmp_path / "run", 40
    proc = subprocess.Popen(_cmd(run_dir, f"train.num_steps={steps}", "checkpoint.every=0"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_steps(run_dir / "metrics.jsonl", 3, proc)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        engine = _sglang_processes(proc.pid)
        assert len(engine) >= 2, "no SGLang scheduler / detokenizer under the trainer"
        for pid in engine:
            mask = _blocked_mask(pid)
            assert all(mask & (1 << (int(sig) - 1)) for sig in STOP_SIGNALS), f"pid {pid}: SigBlk {mask:#x}"
        os.killpg(proc.pid, signal.SIGTERM)  # trainer, reward worker, SGLang's scheduler and detokenizer
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    records = read_metrics(run_dir)
    stopped_at = records[-1]["step"]
    assert 3 <= stopped_at < steps and [r["step"] for r in records] == list(range(1, stopped_at + 1))
    assert f"SIGTERM: step finished; checkpoint written at step {stopped_at}" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{stopped_at:07d}"
    # the engine served every step up to the checkpoint: no crash, no restart
    assert all(r["engine/restarts"] == 0 for r in records)
    _assert_group_gone(proc.pid)

    end = stopped_at + 2
    resumed = subprocess.run(_cmd(run_dir, f"train.num_steps={end}", "checkpoint.every=0", resume=True), cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{stopped_at:07d}'} at step {stopped_at}" in resumed.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, end + 1))
    for r in records[stopped_at:]:
        assert r["engine/restarts"] == 0 and r["rollout/response_len_mean"] > 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{end:07d}"


def _sglang_processes(root: int) -> list[int]:
    """SGLang's scheduler / detokenizer (setproctitle "sglang::...") among `root`'s descendants."""
    found = []
    for pid in descendants(root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sglang::"):
                found.append(pid)
        except OSError:
            pass
    return found


def _blocked_mask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")
