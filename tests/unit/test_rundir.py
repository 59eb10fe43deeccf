"""One run per run dir: the lock names its holder and is taken over when the holder died; a fresh launch never
clobbers a run dir with checkpoints (unless train.overwrite); an unwritable checkpoint.dir is found at setup."""
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_rence import train
from megatron_rence.config import Config
from megatron_rence.rundir import LOCK, RunDirError, claim_run_dir


def _cfg(run_dir, **train_fields) -> Config:
    cfg = Config()
    cfg.train.run_dir = str(run_dir)
    for key, value in train_fields.items():
        setattr(cfg.train, key, value)
    return cfg


def _previous_run(run_dir):
    """What a finished run leaves: two checkpoints, latest, metrics.jsonl (the checkpoint contents do not matter)."""
    for step in (2, 4):
        (run_dir / "checkpoints" / f"iter_{step:07d}").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("iter_0000004\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')


def test_lock_held_by_a_live_process_names_the_dir_pid_and_host(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirError) as err:
            with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
                pass
        text = str(err.value)
        assert f"run dir {tmp_path} is in use by pid {holder.pid} on {socket.gethostname()}" in text, text
        assert (tmp_path / LOCK).exists()  # the holder's lock is left alone
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_process_is_taken_over_and_released_on_exit(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "stale lock" in capsys.readouterr().out
    assert not (tmp_path / LOCK).exists()


def test_lock_on_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "node-that-is-not-this-one"}))
    with pytest.raises(RunDirError, match="in use by pid 1 on node-that-is-not-this-one"):
        with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
            pass


def test_a_second_claim_in_the_same_run_dir_is_refused(tmp_path):
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
                pass
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):  # released: free again
        pass


def test_fresh_launch_into_a_run_dir_with_checkpoints_is_refused_before_anything_is_touched(tmp_path, capsys):
    _previous_run(tmp_path)
    code = train.main(["recipes/demo_cpu.yaml", f"train.run_dir={tmp_path}", "logging.progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"run dir {tmp_path} already holds a run" in err and "--resume" in err and "train.run_dir" in err
    assert "train.overwrite=true" in err
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000002", "iter_0000004", "latest"]
    assert not (tmp_path / LOCK).exists()


def test_resume_or_overwrite_are_accepted(tmp_path, capsys):
    _previous_run(tmp_path)
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
        assert (tmp_path / "checkpoints" / "iter_0000004").is_dir()
    with claim_run_dir(_cfg(tmp_path, overwrite=True), resume=False, rank=0):
        assert not (tmp_path / "metrics.jsonl").exists()
        assert list((tmp_path / "checkpoints").iterdir()) == []
    assert "train.overwrite=true" in capsys.readouterr().out


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


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run(tmp_path, monkeypatch, capsys):
    earlier = {"pid": 4242, "host": "node-a-not-this-one", "slurm_job_id": "77", "slurm_restart_count": "0"}
    (tmp_path / LOCK).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunDirError, match="in use by pid 4242 on node-a-not-this-one"):
        with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued (restart 1): the lock is its own
    with claim_run_dir(_cfg(tmp_path), resume=True, rank=0):
        held = json.loads((tmp_path / LOCK).read_text())
        assert held["pid"] == os.getpid() and held["slurm_restart_count"] == "1"
    assert "earlier run of Slurm job 77" in capsys.readouterr().out


def test_an_unreadable_old_lock_is_taken_over(tmp_path, capsys):
    (tmp_path / LOCK).write_text('{"pid": 12')  # torn
    os.utime(tmp_path / LOCK, (0, 0))
    with claim_run_dir(_cfg(tmp_path), resume=False, rank=0):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert "unreadable" in capsys.readouterr().out
