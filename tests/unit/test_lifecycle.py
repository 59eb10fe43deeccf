"""Stop signals vs the processes we start (lifecycle.py): reward workers and forked children ignore SIGTERM /
SIGUSR1 / SIGINT and die with their parent (kill -9 leaves nothing); children started inside
`stop_signals_blocked` inherit the block, the parent's mask comes back; a checkpoint save starts no
long-lived helper process (megatron's writer Manager, which a job-wide SIGTERM killed before the save)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_rence import lifecycle
from megatron_rence.config import RewardConfig
from megatron_rence.rewards.pool import RewardPool

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pids, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _blocked_mask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


def _bit(sig) -> int:
    return 1 << (int(sig) - 1)


def test_reward_workers_ignore_stop_signals_and_keep_grading():
    with RewardPool(RewardConfig(num_workers=2, timeout_s=30.0)) as pool:
        assert [r.reward for r in pool.grade(["\\boxed{3}"], ["3"])] == [1.0]  # workers are up
        pids = [w.process.pid for w in pool._workers]
        for pid in pids:
            for sig in lifecycle.STOP_SIGNALS:
                os.kill(pid, sig)
        time.sleep(0.5)
        assert all(_alive(p) for p in pids)
        results = pool.grade(["\\boxed{3}", "\\boxed{4}", "\\boxed{5}"], ["3", "3", "5"])
        assert [r.reward for r in results] == [1.0, 0.0, 1.0]
        assert pool.metrics()["reward/num_worker_restarts"] == 0
    assert _wait_gone(pids, 10.0) == []  # close() stops them


OWNER = textwrap.dedent("""
    import os, sys, time
    from megatron_rence import lifecycle
    from megatron_rence.config import RewardConfig
    from megatron_rence.rewards.pool import RewardPool
    lifecycle.install_fork_hook()
    pool = RewardPool(RewardConfig(num_workers=2, timeout_s=30.0))
    pool.grade(["\\\\boxed{1}"], ["1"])
    pids = [w.process.pid for w in pool._workers]
    child = os.fork()
    if child == 0:
        while True:
            time.sleep(1)
    pids.append(child)
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(600)
""")


def test_kill_9_of_the_owner_leaves_no_worker_or_forked_child():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    owner = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        for sig in lifecycle.STOP_SIGNALS:  # the forked child ignores them too
            os.kill(pids[2], sig)
        time.sleep(0.3)
        assert _alive(pids[2])
        owner.kill()
        owner.wait()
        assert _wait_gone(pids) == [], "children outlived their parent"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def test_children_started_inside_the_block_inherit_it_and_the_mask_is_restored():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with lifecycle.stop_signals_blocked():
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        mask = _blocked_mask(child.pid)
        assert all(mask & _bit(sig) for sig in lifecycle.STOP_SIGNALS)
        os.kill(child.pid, signal.SIGTERM)  # blocked: stays pending, the child lives
        time.sleep(0.3)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_first_spawn_inside_the_block_keeps_every_stop_signal_blocked_in_its_children(tmp_path):
    """A fresh interpreter whose first multiprocessing spawn happens inside the block (as when the SGLang
    engine is the first spawn of a training run): CPython starts its resource tracker there, which unblocked
    SIGINT / SIGTERM in the caller, so the spawned process had only SIGUSR1 blocked (SigBlk 0x200)."""
    script = textwrap.dedent("""
        import multiprocessing as mp, signal, sys, time
        from megatron_rence import lifecycle

        def sleep():
            time.sleep(60)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            with lifecycle.stop_signals_blocked():
                first = ctx.Process(target=sleep, daemon=True)
                first.start()
                second = ctx.Process(target=sleep, daemon=True)
                second.start()
            print(first.pid, second.pid, flush=True)
            sys.stdin.readline()
            first.kill()  # SIGTERM (daemon clean-up's terminate) is blocked in them
            second.kill()
    """)
    (tmp_path / "first_spawn.py").write_text(script)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "first_spawn.py")], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2, "the script did not start its children"
        for pid in pids:
            mask = _blocked_mask(pid)
            assert all(mask & _bit(sig) for sig in lifecycle.STOP_SIGNALS), f"SigBlk {mask:#x} of pid {pid}"
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_become_child_ignores_unblocks_and_exits_when_the_parent_is_already_gone():
    code = ("import os, signal; from megatron_rence import lifecycle\n"
            "lifecycle.become_child(os.getppid())\n"
            "print(all(signal.getsignal(s) == signal.SIG_IGN for s in lifecycle.STOP_SIGNALS), flush=True)\n"
            "lifecycle.become_child(os.getppid() + 1_000_000)  # not our parent: exits at once\n"
            "print('still here')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with lifecycle.stop_signals_blocked():
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True"] and out.returncode == 1, out.stderr


def test_descendants_lists_children_and_grandchildren():
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\ntime.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(lifecycle.descendants(os.getpid())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        found = lifecycle.descendants(os.getpid())
        assert child.pid in found and len(found) == 2
    finally:
        for pid in lifecycle.descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_prctl_is_resolved_on_linux():
    assert lifecycle._prctl is not None


def test_checkpoint_save_leaves_no_helper_process(tmp_path):
    """The torch_dist writer's results queue is in-process: after a save no child of ours is running (before,
    a multiprocessing Manager stayed, and a job-wide SIGTERM killed it before the preemption save)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_rence.config import Config, ModelConfig
    from megatron_rence.megatron.model import build_model
    from megatron_rence.megatron.step import Trainer
    from tests.megatron_state import single_rank

    with single_rank(seed=3) as pstate:
        cfg = Config()
        cfg.model = ModelConfig(num_layers=1, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                                num_query_groups=1, max_position_embeddings=16, make_vocab_size_divisible_by=8,
                                dtype="fp32")
        trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, 24), pstate, 24)
        before = lifecycle.descendants(os.getpid())
        trainer.save(tmp_path, 1, {"step": 1})
        trainer.save(tmp_path, 2, {"step": 2})
        assert lifecycle.descendants(os.getpid()) - before == set()
        assert type(filesystem_async._results_queue).__module__ == "queue"
        assert (tmp_path / "latest").read_text().strip() == "iter_0000002"


def _disposition_in(pid: int, sig: int) -> str:
    """'ignored', 'caught' or 'default', as /proc/PID/status says (SigIgn / SigCgt)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    if int(fields["SigIgn"], 16) & _bit(sig):
        return "ignored"
    return "caught" if int(fields["SigCgt"], 16) & _bit(sig) else "default"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_stop_flag_lasts_as_long_as_the_run_and_only_the_program_leaves_the_signals_ignored():
    # An ignored signal is inherited through exec, and bash cannot trap one ignored at its start: a trainer run
    # inside a process that goes on (a test, a notebook) must not leave SIGTERM / SIGUSR1 ignored behind it.
    from megatron_rence.train import StopFlag

    found = {sig: signal.getsignal(sig) for sig in lifecycle.STOP_SIGNALS}
    shell = "trap 'echo trapped' USR1; kill -USR1 $$; sleep 0.2; echo done"
    with StopFlag() as stop:
        assert all(signal.getsignal(sig) == stop._handle for sig in lifecycle.STOP_SIGNALS)
        assert lifecycle._fork_hook_on
    assert {sig: signal.getsignal(sig) for sig in lifecycle.STOP_SIGNALS} == found and not lifecycle._fork_hook_on
    assert subprocess.run(["bash", "-c", shell], capture_output=True, text=True).stdout == "trapped\ndone\n"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        assert _disposition_in(child.pid, signal.SIGTERM) == "default"
    finally:
        child.kill()
        child.wait()
    try:
        with StopFlag(ignore_after=True):  # the program's way out: a repeated warning must not kill it
            pass
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == found[signal.SIGINT]
        # what a shell started now would get: the trap cannot be set, the signal is ignored
        assert subprocess.run(["bash", "-c", shell], capture_output=True, text=True).stdout == "done\n"
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)
