"""One run per run dir: flock-held locks on the run dir and the checkpoint dir (atomic takeover of a dead
holder's lock, whatever its file says); a fresh launch never clobbers a run dir with checkpoints; train.overwrite
sets the old run aside until the new run's first checkpoint and refuses a checkpoint.load inside it; an
unwritable checkpoint.dir is found at setup."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_rence import rundir, runlock, train
from megatron_rence.config import Config
from megatron_rence.rundir import LOCK, RunDirError, claim_run_dir

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(run_dir, **train_fields) -> Config:
    cfg = Config()
    cfg.train.run_dir = str(run_dir)
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    return cfg


def _previous_run(run_dir):
    """What a finished run leaves: two checkpoints, latest, metrics.jsonl, TensorBoard events, eval reports
    (the checkpoint contents do not matter here)."""
    for step in (2, 4):
        (run_dir / "checkpoints" / f"iter_{step:07d}").mkdir(parents=True)
        (run_dir / "checkpoints" / f"iter_{step:07d}" / "run_state.pt").write_text(f"old {step}")
    (run_dir / "checkpoints" / "latest").write_text("iter_0000004\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events").write_text("tb")
    (run_dir / "eval" / "step_000004").mkdir(parents=True)
    (run_dir / "eval" / "summary.jsonl").write_text('{"step": 4}\n')


def _previous_run_intact(run_dir) -> bool:
    ckpts = run_dir / "checkpoints"
    return (sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["iter_0000002", "iter_0000004",
                                                                                     "latest"]
            and (ckpts / "iter_0000004" / "run_state.pt").read_text() == "old 4"
            and (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'
            and (run_dir / "tensorboard" / "events").is_file()
            and (run_dir / "eval" / "summary.jsonl").read_text() == '{"step": 4}\n'
            and (run_dir / "eval" / "step_000004").is_dir()
            and not (run_dir / rundir.JOURNAL).exists())


class Holder:
    """Another process that holds `directory`'s lock (flock on .lock) with `content` in the file until stopped."""

    def __init__(self, directory, content: str, hold_s: float = 60.0):
        code = textwrap.dedent(f"""
            import fcntl, os, sys, time
            fd = os.open({str(directory / LOCK)!r}, os.O_RDWR | os.O_CREAT)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.write(fd, {content.encode()!r})
            print("held", flush=True)
            time.sleep({hold_s})
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def test_lock_held_by_a_live_process_names_the_dir_pid_and_host(tmp_path):
    holder = Holder(tmp_path, json.dumps({"pid": 4242, "host": "node-b", "started": "then", "run_dir": "/r"}))
    try:
        with pytest.raises(RunDirError) as err:
            with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
                pass
        text = str(err.value)
        assert f"run dir {tmp_path} is in use by pid 4242 on node-b (since then; run dir /r)" in text, text
        assert (tmp_path / LOCK).exists()  # the holder's lock is left alone
    finally:
        holder.stop()
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):  # its death released it
        pass


def test_lock_of_a_dead_process_is_taken_over_and_released_on_exit(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by pid {dead.pid}" in capsys.readouterr().out
    assert not (tmp_path / LOCK).exists()


def test_a_stale_lock_whose_pid_now_belongs_to_another_program_is_taken_over(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the reused pid
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
            assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        assert f"pid {other.pid}" in capsys.readouterr().out and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_torn_lock_is_judged_by_whether_anyone_holds_it_not_by_its_age(tmp_path, capsys):
    (tmp_path / LOCK).write_text('{"pid": 12')  # torn a moment ago by a launch that crashed
    start = time.monotonic()
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert time.monotonic() - start < 1.0 and "unreadable lock file" in capsys.readouterr().out
    holder = Holder(tmp_path, '{"pid": 12')  # torn, but its holder is alive: refused, saying so
    try:
        with pytest.raises(RunDirError, match="in use by another process .its lock file is empty or unreadable"):
            with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
                pass
    finally:
        holder.stop()


RACER = """
import json, sys, time
from megatron_rence import rundir
from megatron_rence.config import Config
if hasattr(rundir, "_pid_alive"):  # the slow pid check of the report (code that still checks pids)
    real = rundir._pid_alive
    rundir._pid_alive = lambda pid: (time.sleep(1.0), real(pid))[1]
cfg = Config()
cfg.train.run_dir = sys.argv[1]
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with rundir.claim_run_dir(cfg, resume=True, rank=0):
        start = time.time()
        time.sleep(2.0)
        print(json.dumps([start, time.time()]), flush=True)
except rundir.RunDirError as exc:
    print(json.dumps("refused"), flush=True)
"""


def test_two_launches_racing_for_a_stale_lock_never_both_hold_it(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    go = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(go)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    held = sorted(r for r in results if r != "refused")
    assert held, results
    assert all(a[1] <= b[0] for a, b in zip(held, held[1:])), f"two launches held the lock at once: {held}"


def test_two_run_dirs_sharing_a_checkpoint_dir_exclude_each_other(tmp_path):
    shared = tmp_path / "shared_ckpts"
    a, b = _cfg(tmp_path / "a"), _cfg(tmp_path / "b")
    a.checkpoint.dir = b.checkpoint.dir = str(shared)
    with claim_run_dir(a, resume=True, rank=0):
        with pytest.raises(RunDirError) as err:
            with claim_run_dir(b, resume=True, rank=0):
                pass
        assert f"checkpoint dir {shared} is in use by pid {os.getpid()}" in str(err.value)
        assert f"run dir {tmp_path / 'a'}" in str(err.value) and "checkpoint.dir" in str(err.value)
    c = _cfg(tmp_path / "c")  # a run dir whose checkpoint.dir is another run's default checkpoint dir
    c.checkpoint.dir = str(tmp_path / "a" / "checkpoints")
    with claim_run_dir(_cfg(tmp_path / "a"), resume=True, rank=0):
        with pytest.raises(RunDirError, match="checkpoint dir .* is in use"):
            with claim_run_dir(c, resume=True, rank=0):
                pass
    assert not (shared / LOCK).exists() and not (tmp_path / "b" / LOCK).exists()  # the refused launch let go


def test_a_forked_child_never_releases_the_parents_lock(tmp_path):
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0) as locks:
        pid = os.fork()
        if pid == 0:  # the child: its copy of the descriptor is closed at fork; release() is not its to do
            for lock in locks:
                lock.release()
            os._exit(0)
        os.waitpid(pid, 0)
        assert (tmp_path / LOCK).exists()
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
                pass


def test_a_second_claim_in_the_same_run_dir_is_refused(tmp_path):
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
                pass
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):  # released: free again
        pass


def test_a_requeued_slurm_job_waits_for_the_lock_of_its_earlier_run(tmp_path, monkeypatch, capsys):
    earlier = {"pid": 4242, "host": "node-a", "slurm_job_id": "77", "slurm_restart_count": "0"}
    holder = Holder(tmp_path, json.dumps(earlier), hold_s=3.0)
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused at once
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirError, match="in use by pid 4242 on node-a"):
        with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued: waits until its earlier run lets go
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["slurm_restart_count"] == "1"
    assert "earlier run of Slurm job 77" in capsys.readouterr().out
    holder.stop()


def test_a_requeued_slurm_job_gives_up_after_the_wait(tmp_path, monkeypatch):
    holder = Holder(tmp_path, json.dumps({"pid": 4242, "host": "node-a", "slurm_job_id": "77",
                                          "slurm_restart_count": "0"}))
    monkeypatch.setattr(runlock, "SLURM_TAKEOVER_WAIT_S", 1.5)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    try:
        with pytest.raises(RunDirError, match=f"delete {tmp_path / LOCK}"):
            with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
                pass
    finally:
        holder.stop()


# ----------------------------------------------------------------------------------------------- fresh launch
def test_fresh_launch_into_a_run_dir_with_checkpoints_is_refused_before_anything_is_touched(tmp_path, capsys):
    _previous_run(tmp_path)
    code = train.main(["recipes/demo_cpu.yaml", f"train.run_dir={tmp_path}", "logging.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"run dir {tmp_path} already holds a run" in err and "--resume" in err and "train.run_dir" in err
    assert "train.overwrite=true" in err
    assert _previous_run_intact(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_resume_is_accepted(tmp_path):
    _previous_run(tmp_path)
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
        assert _previous_run_intact(tmp_path)


def test_overwrite_sets_the_old_run_aside_and_moves_it_back_if_no_checkpoint_follows(tmp_path, capsys):
    _previous_run(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with claim_run_dir(_cfg(tmp_path, overwrite=True), resume=False, rank=0):
            assert not any(p.name.startswith(("iter_", "latest")) for p in (tmp_path / "checkpoints").iterdir())
            assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "eval" / "summary.jsonl").exists()
            assert (tmp_path / "checkpoints" / "previous_run" / "iter_0000004" / "run_state.pt").is_file()
            (tmp_path / "metrics.jsonl").write_text('{"step": 1, "new": true}\n')  # the new run's first step
            raise KeyboardInterrupt  # stopped before its first checkpoint
    out = capsys.readouterr().out
    assert "set aside" in out and "back in place" in out
    assert _previous_run_intact(tmp_path)
    assert (tmp_path / "metrics.jsonl.1").read_text() == '{"step": 1, "new": true}\n'  # kept, not lost


def test_overwrite_removes_the_old_run_once_the_new_run_has_a_checkpoint(tmp_path):
    _previous_run(tmp_path)
    cfg = _cfg(tmp_path, overwrite=True)
    with claim_run_dir(cfg, resume=False, rank=0):
        (tmp_path / "checkpoints" / "iter_0000001").mkdir()  # the new run's first checkpoint
        rundir.forget_previous_run(cfg)
        assert not (tmp_path / "checkpoints" / "previous_run").exists()
        assert not (tmp_path / "previous_run").exists() and not (tmp_path / "eval" / "previous_run").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000001"]


def test_an_overwrite_killed_midway_is_undone_by_the_next_launch(tmp_path, monkeypatch):
    _previous_run(tmp_path)
    real_rename, moved = os.rename, []

    def dying_rename(src, dst):  # kill -9 after three of the moves
        if len(moved) == 3:
            raise SystemExit("killed")
        moved.append(src)
        real_rename(src, dst)

    monkeypatch.setattr(rundir.os, "rename", dying_rename)
    with pytest.raises(SystemExit):
        rundir.check_fresh_launch(_cfg(tmp_path, overwrite=True), resume=False)  # no claim: nothing cleans up
    monkeypatch.setattr(rundir.os, "rename", real_rename)
    assert not _previous_run_intact(tmp_path) and (tmp_path / rundir.JOURNAL).exists()
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
        assert _previous_run_intact(tmp_path)


def test_overwrite_with_a_checkpoint_load_inside_that_run_is_refused_by_dry_run_and_at_start(tmp_path, capsys):
    _previous_run(tmp_path)
    load = tmp_path / "checkpoints" / "iter_0000004"
    args = ["recipes/demo_cpu.yaml", f"train.run_dir={tmp_path}", "train.overwrite=true", f"checkpoint.load={load}",
            "logging.progress_bar=false"]
    with pytest.raises(SystemExit) as exit_:
        train.main(args + ["--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "checkpoint.load" in err and f"{load} is inside the checkpoint dir" in err and "train.overwrite" in err
    with pytest.raises(SystemExit) as exit_:
        train.main(args)
    assert exit_.value.code == 2 and _previous_run_intact(tmp_path)
    cfg = _cfg(tmp_path, overwrite=True)  # a caller that skipped validation: refused at the claim
    cfg.checkpoint.load = str(tmp_path / "checkpoints")
    with pytest.raises(RunDirError, match="checkpoint.load: .* is inside the checkpoint dir"):
        with claim_run_dir(cfg, resume=False, rank=0):
            pass
    assert _previous_run_intact(tmp_path)


def test_unwritable_checkpoint_dir_is_found_at_setup(tmp_path):
    (tmp_path / "a_file").write_text("")
    cfg = _cfg(tmp_path / "run")
    cfg.checkpoint.dir = str(tmp_path / "a_file" / "ckpt")
    with pytest.raises(RunDirError) as err:
        with claim_run_dir(cfg, resume=False, rank=0):
            pass
    assert f"checkpoint.dir: {tmp_path / 'a_file' / 'ckpt'} is not writable: not a directory" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_checkpoint_dir_names_permission_denied(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    cfg = _cfg(tmp_path / "run")
    cfg.checkpoint.dir = str(ro)
    with pytest.raises(RunDirError, match="checkpoint.dir: .* is not writable: permission denied"):
        with claim_run_dir(cfg, resume=False, rank=0):
            pass


def test_other_ranks_do_not_touch_the_run_dir(tmp_path):
    _previous_run(tmp_path)
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=1) as lock:
        assert lock is None and not (tmp_path / LOCK).exists()
