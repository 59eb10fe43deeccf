"""Checkpoints (one process): round trip of weights, Adam state, LR schedule, RNG and run state; a crash mid-save
leaves the previous checkpoint and `latest` intact; keep_last pruning; error messages name the path."""
import random

import numpy as np
import pytest
import torch

from megatron_rence.config import Config, ModelConfig, OptimConfig
from megatron_rence.megatron import checkpoint
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective
from tests.megatron_state import single_rank, tiny_grpo_config

VOCAB = 53
K = 2


@pytest.fixture(scope="module")
def pstate():
    with single_rank(seed=11) as state:
        yield state


def make_trainer(pstate, seed: int) -> Trainer:
    cfg = tiny_grpo_config(K)
    torch.manual_seed(seed)  # CPU initialisation draws from the default generator: different seed, other weights
    return Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), pstate, VOCAB)


def step(t: Trainer, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randint(1, VOCAB, (7,), generator=g).tolist(), 3) for _ in range(2 * K)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    objective = get_objective(t.cfg.objective)
    old = [v + 0.1 for v in t.logprobs(seqs, 1.0)]
    return t.train_step(seqs, objective, rewards, old, group_size=K, normalizer=4.0)


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model_chunks[0].parameters()]


def test_round_trip_restores_weights_adam_state_schedule_rng_and_run_state(pstate, tmp_path):
    a = make_trainer(pstate, seed=1)
    step(a, 0)
    step(a, 1)
    run_state = {"step": 2, "data": {"epoch": 0, "index": 17}, "objective": {"name": "grpo", "kl": {"coef": 0.3}}}
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    path = a.save(tmp_path, 2, run_state)
    assert path == tmp_path / "iter_0000002" and checkpoint.latest(tmp_path) == path
    draws = (random.random(), np.random.rand(), torch.rand(1))
    m3 = step(a, 2)  # continue the original: the third step's update depends on Adam moments and lr
    after = params(a)

    b = make_trainer(pstate, seed=2)
    assert any(not torch.equal(x, y) for x, y in zip(params(b), params(a)))
    loaded = b.load(tmp_path)  # the root: resolves `latest`
    assert loaded["checkpoint"] == str(path)
    assert {k: v for k, v in loaded.items() if k != "checkpoint"} == run_state
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws  # RNG states restored
    assert b.scheduler.num_steps == a.scheduler.num_steps - 1
    m3b = step(b, 2)
    assert m3b["train/lr"] == m3["train/lr"]
    assert m3b["loss/total"] == pytest.approx(m3["loss/total"], rel=1e-6)
    for x, y in zip(params(b), after):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)

    c = make_trainer(pstate, seed=3)  # weights only: same weights, fresh optimizer and schedule
    c.load(path, weights_only=True)
    assert c.scheduler.num_steps == 1
    for x, y in zip(params(c), params(make_trainer_loaded(pstate, path))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def make_trainer_loaded(pstate, path) -> Trainer:
    t = make_trainer(pstate, seed=4)
    t.load(path)
    return t


def test_crash_mid_save_keeps_previous_checkpoint_and_latest(pstate, tmp_path, monkeypatch):
    t = make_trainer(pstate, seed=1)
    step(t, 0)
    good = t.save(tmp_path, 1, {"step": 1})
    saved = params(t)
    step(t, 1)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the sharded tensors were written")

    monkeypatch.setattr(checkpoint, "_write_run_state", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.save(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    assert (tmp_path / "iter_0000002.tmp").is_dir() and not (tmp_path / "iter_0000002").exists()
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert checkpoint.latest(tmp_path) == good
    fresh = make_trainer(pstate, seed=5)
    assert fresh.load(tmp_path)["step"] == 1
    for x, y in zip(params(fresh), saved):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    t.save(tmp_path, 2, {"step": 2})  # the next save succeeds and removes the debris
    assert not (tmp_path / "iter_0000002.tmp").exists()
    assert checkpoint.latest(tmp_path) == tmp_path / "iter_0000002"


def test_keep_last_prunes_oldest_and_resave_replaces(pstate, tmp_path):
    t = make_trainer(pstate, seed=1)
    for s in range(1, 5):
        t.save(tmp_path, s, {"step": s}, keep_last=2)
    assert [p.name for _, p in checkpoint.complete_checkpoints(tmp_path)] == ["iter_0000003", "iter_0000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000003", "iter_0000004", "latest"]
    t.save(tmp_path, 4, {"step": 4, "again": True}, keep_last=2)  # re-saving a step replaces it
    assert make_trainer(pstate, seed=2).load(tmp_path)["again"] is True


def test_missing_checkpoints_name_the_path(pstate, tmp_path):
    t = make_trainer(pstate, seed=1)
    assert checkpoint.latest(tmp_path / "nothing") is None
    with pytest.raises(FileNotFoundError, match="nothing"):
        t.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "iter_0000009.tmp").mkdir()  # debris is never a checkpoint
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        t.load(tmp_path / "empty")


# ---- issue 17: checksums at save, checked at load with a fallback; non-finite weights; write errors
import errno  # noqa: E402
import json  # noqa: E402

from megatron_rence.megatron import ckpt_integrity  # noqa: E402


def _two_checkpoints(pstate, root):
    t = make_trainer(pstate, seed=1)
    step(t, 0)
    t.save(root, 1, {"step": 1})
    first = params(t)
    step(t, 1)
    t.save(root, 2, {"step": 2})
    return first


def _truncate_distcp(ckpt):
    path = sorted(ckpt.glob("*.distcp"))[0]
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _empty_run_state(ckpt):
    (ckpt / "run_state.pt").write_bytes(b"")
    return ckpt / "run_state.pt"


def _garbage_common(ckpt):
    (ckpt / "common.pt").write_bytes(b"\x80garbage" * 50)
    return ckpt / "common.pt"


def _garbage_inside_distcp(ckpt):
    path = sorted(ckpt.glob("*.distcp"))[0]
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 - 2048  # 4 KB of garbage in the tensor payload, same size
    data[offset:offset + 4096] = bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist())
    path.write_bytes(bytes(data))
    return path


def _garbage_manifest(ckpt):
    (ckpt / "manifest.json").write_text('{"format": 1, "files": [')
    return ckpt / "manifest.json"


def test_manifest_lists_every_file_with_size_and_sha256(pstate, tmp_path):
    t = make_trainer(pstate, seed=1)
    ckpt = t.save(tmp_path, 1, {"step": 1})
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert sorted([*files, "manifest.json"]) == on_disk
    assert "run_state.pt" in files and "rng/rank_00000.pt" in files and any(f.endswith(".distcp") for f in files)
    for name, entry in files.items():
        assert entry["size"] == (ckpt / name).stat().st_size
        assert entry["sha256"] == ckpt_integrity.sha256_file(ckpt / name)


@pytest.mark.parametrize("damage", [_truncate_distcp, _empty_run_state, _garbage_common, _garbage_inside_distcp,
                                    _garbage_manifest])
def test_corrupt_latest_is_reported_and_the_newest_intact_one_loaded(pstate, tmp_path, capsys, damage):
    first = _two_checkpoints(pstate, tmp_path)
    bad_file = damage(tmp_path / "iter_0000002")
    capsys.readouterr()
    fresh = make_trainer(pstate, seed=5)
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'iter_0000002'} is corrupt.*{bad_file.name}"):
        fresh.load(tmp_path / "iter_0000002")  # named explicitly: no silent substitute
    assert (tmp_path / "iter_0000002").is_dir()  # and the user's own pick is not renamed
    state = fresh.load(tmp_path)
    out = capsys.readouterr().out
    assert state["step"] == 1 and state["checkpoint"] == str(tmp_path / "iter_0000001")
    assert "warning" in out and str(bad_file) in out and str(tmp_path / "iter_0000001") in out, out
    for x, y in zip(params(fresh), first):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert (tmp_path / "iter_0000002.corrupt").is_dir() and checkpoint.latest(tmp_path) == tmp_path / "iter_0000001"


def test_no_intact_checkpoint_names_every_corrupt_file(pstate, tmp_path):
    _two_checkpoints(pstate, tmp_path)
    a, b = _empty_run_state(tmp_path / "iter_0000001"), _truncate_distcp(tmp_path / "iter_0000002")
    with pytest.raises(ValueError, match="no intact checkpoint") as err:
        make_trainer(pstate, seed=5).load(tmp_path)
    assert str(a) in str(err.value) and str(b) in str(err.value)


def _unverified(pstate):
    t = make_trainer(pstate, seed=5)
    t.cfg.checkpoint.allow_unverified = True
    return t


def test_checkpoint_without_manifest_is_refused_unless_allowed_and_unreadable_files_are_named(pstate, tmp_path,
                                                                                             capsys):
    t = make_trainer(pstate, seed=1)
    ckpt = t.save(tmp_path, 1, {"step": 1})
    (ckpt / "manifest.json").unlink()  # as written before checksums existed
    for path in (tmp_path, ckpt):
        with pytest.raises(ckpt_integrity.CheckpointLoadError) as err:
            make_trainer(pstate, seed=5).load(path)
        assert f"checkpoint {ckpt} has no manifest.json" in str(err.value)
        assert "set checkpoint.allow_unverified=true" in str(err.value)
    assert ckpt.is_dir()  # refused, not renamed: it is unverifiable, not known to be corrupt
    assert _unverified(pstate).load(tmp_path)["step"] == 1
    assert "no manifest.json: loading it unchecked (checkpoint.allow_unverified=true)" in capsys.readouterr().out
    (ckpt / "run_state.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{ckpt / 'run_state.pt'} is unreadable"):
        _unverified(pstate).load(tmp_path)


def test_a_deleted_manifest_does_not_let_corrupt_weights_load(pstate, tmp_path, capsys):
    first = _two_checkpoints(pstate, tmp_path)
    _garbage_inside_distcp(tmp_path / "iter_0000002")
    (tmp_path / "iter_0000002" / "manifest.json").unlink()
    fresh = make_trainer(pstate, seed=5)
    assert fresh.load(tmp_path)["step"] == 1  # --resume: the newest checkpoint that can be verified
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'iter_0000002'} has no manifest.json" in out and "allow_unverified" in out
    for x, y in zip(params(fresh), first):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_keep_last_never_counts_a_checkpoint_found_corrupt(pstate, tmp_path, capsys):
    t = make_trainer(pstate, seed=1)
    for s in (2, 4):
        t.save(tmp_path, s, {"step": s}, keep_last=2)
    _truncate_distcp(tmp_path / "iter_0000004")
    resumed = make_trainer(pstate, seed=5)
    assert resumed.load(tmp_path)["step"] == 2  # the corrupt latest is skipped ...
    assert "renamed iter_0000004.corrupt" in capsys.readouterr().out
    resumed.save(tmp_path, 3, {"step": 3}, keep_last=2)  # ... and never counted by keep_last again
    assert [p.name for _, p in checkpoint.complete_checkpoints(tmp_path)] == ["iter_0000002", "iter_0000003"]
    assert (tmp_path / "iter_0000004.corrupt").is_dir()  # kept for inspection, never pruned
    resumed.save(tmp_path, 4, {"step": 4}, keep_last=2)
    assert [p.name for _, p in checkpoint.complete_checkpoints(tmp_path)] == ["iter_0000003", "iter_0000004"]
    assert make_trainer(pstate, seed=6).load(tmp_path)["step"] == 4


def test_latest_pointing_outside_the_checkpoint_dir_is_ignored(pstate, tmp_path, capsys):
    mine, other = tmp_path / "run" / "checkpoints", tmp_path / "other" / "checkpoints"
    t = make_trainer(pstate, seed=1)
    t.save(mine, 2, {"step": 2, "run": "mine"})
    t.save(other, 4, {"step": 4, "run": "other"})
    (mine / "latest").write_text("../../other/checkpoints/iter_0000004\n")
    assert checkpoint.latest(mine) == mine / "iter_0000002"
    assert "not a checkpoint directory of" in capsys.readouterr().out
    assert make_trainer(pstate, seed=5).load(mine)["run"] == "mine"
    (mine / "iter_0000009").symlink_to(other / "iter_0000004")  # a symlink out of the run is not its checkpoint
    (mine / "latest").write_text("iter_0000009\n")
    assert checkpoint.latest(mine) == mine / "iter_0000002"
    assert [s for s, _ in checkpoint.complete_checkpoints(mine)] == [2]
    assert make_trainer(pstate, seed=5).load(mine)["run"] == "mine"


def test_a_checkpoint_of_another_model_names_the_checkpoint_the_tensor_and_the_setting(pstate, tmp_path):
    ckpt = make_trainer(pstate, seed=1).save(tmp_path, 1, {"step": 1})
    other = Config()
    other.model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=48, num_attention_heads=4,
                              num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8,
                              tie_word_embeddings=True, dtype="fp32")
    other.optim = OptimConfig(lr=1e-2)
    other.train.micro_batch_size, other.train.num_steps, other.rollout.num_samples = 2 * K, 8, K
    wider = Trainer(other, build_model(other.model, other.parallel, VOCAB), pstate, VOCAB)
    for weights_only in (False, True):
        with pytest.raises(ckpt_integrity.CheckpointLoadError) as err:  # an Exception, not megatron's BaseException
            wider.load(tmp_path, weights_only=weights_only)
        text = str(err.value)
        assert f"checkpoint {ckpt} holds another model" in text, text
        assert "embedding.word_embeddings.weight: shape [56, 32] in the checkpoint, [56, 64] in this model" in text
        assert "model.hidden_size: 32 in the checkpoint, 64 in this run" in text
    other.model.hidden_size, other.model.make_vocab_size_divisible_by = 32, 16  # 64 vocab rows, not 56: padding
    padded = Trainer(other, build_model(other.model, other.parallel, VOCAB), pstate, VOCAB)
    assert padded.load(tmp_path, weights_only=True)["step"] == 1  # megatron loads padded rows (TP changes them)


def test_nonfinite_weights_are_never_written_nor_made_latest(pstate, tmp_path):
    t = make_trainer(pstate, seed=1)
    good = t.save(tmp_path, 1, {"step": 1})
    name, p = next(iter(t.model_chunks[0].named_parameters()))
    with torch.no_grad():
        p.view(-1)[3] = float("nan")
    with pytest.raises(ckpt_integrity.NonFiniteWeights, match=f"step 2 .*parameter {name} .*NaN / inf"):
        t.save(tmp_path, 2, {"step": 2})
    assert not (tmp_path / "iter_0000002").exists() and not (tmp_path / "iter_0000002.tmp").exists()
    assert checkpoint.latest(tmp_path) == good and (tmp_path / "latest").read_text().strip() == good.name


@pytest.mark.parametrize("where", ["sharded", "worker", "torch_save"])
def test_disk_full_names_the_path_and_no_space_left(pstate, tmp_path, monkeypatch, where):
    t = make_trainer(pstate, seed=1)
    good = t.save(tmp_path, 1, {"step": 1})

    def enospc(*args, **kwargs):  # a fake: a real full disk needs a tiny file system mounted for the test
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_full(*args, **kwargs):  # what torch.save raises on a full disk: no errno, no path
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    def worker_full(*args, **kwargs):  # what megatron's torch_dist writer raises: a BaseException, no errno
        from torch.distributed.checkpoint.api import CheckpointException

        raise CheckpointException("save", {0: (RuntimeError("Worker failure: [Errno 28] No space left on device"),
                                               [])})

    if where == "sharded":
        monkeypatch.setattr(checkpoint, "_write_sharded", enospc)
    elif where == "worker":
        monkeypatch.setattr(checkpoint, "_write_sharded", worker_full)
    else:
        monkeypatch.setattr(checkpoint.torch, "save", torch_full)
        monkeypatch.setattr(ckpt_integrity.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(ckpt_integrity.CheckpointWriteError) as err:
        t.save(tmp_path, 2, {"step": 2})
    monkeypatch.undo()
    text = str(err.value)
    assert f"writing checkpoint {tmp_path / 'iter_0000002.tmp'} failed: no space left on device" in text, text
    assert checkpoint.latest(tmp_path) == good


def test_permission_error_names_the_path_and_the_cause(pstate, tmp_path, monkeypatch):
    t = make_trainer(pstate, seed=1)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(checkpoint, "_write_run_state", denied)
    with pytest.raises(ckpt_integrity.CheckpointWriteError, match=f"{tmp_path / 'iter_0000001.tmp'} failed: "
                                                                  "permission denied"):
        t.save(tmp_path, 1, {"step": 1})


def test_a_real_full_disk_names_the_path_and_keeps_the_previous_checkpoint(pstate, tmp_path):
    """On a tmpfs sized for one checkpoint and a half (needs root and mount; skipped elsewhere)."""
    import os
    import subprocess

    t = make_trainer(pstate, seed=1)
    size = sum(p.stat().st_size for p in t.save(tmp_path / "probe", 1, {"step": 1}).rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs",
                                            str(disk)], capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root and mount permission")
    try:
        good = t.save(disk, 1, {"step": 1})
        with pytest.raises(ckpt_integrity.CheckpointWriteError) as err:
            t.save(disk, 2, {"step": 2})
        assert f"writing checkpoint {disk / 'iter_0000002.tmp'} failed: no space left on device" in str(err.value)
        assert checkpoint.latest(disk) == good
        assert make_trainer(pstate, seed=5).load(disk)["step"] == 1
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_keep_last_never_prunes_the_checkpoint_the_run_was_told_to_load(pstate, tmp_path):
    t = make_trainer(pstate, seed=1)
    t.save(tmp_path, 1, {"step": 1})
    t.cfg.checkpoint.load = str(tmp_path / "iter_0000001")  # e.g. the reference weights of an online_dpo run
    for s in range(2, 5):
        t.save(tmp_path, s, {"step": s}, keep_last=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [1, 3, 4]
    t.cfg.checkpoint.load = None
    t.save(tmp_path, 5, {"step": 5}, keep_last=2)
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [4, 5]


def test_a_weights_only_load_reads_without_renaming_anything(pstate, tmp_path):
    """checkpoint.load of another run's root (or an exporter) only reads: a corrupt checkpoint there is skipped,
    not renamed; only a resume of the run's own, locked checkpoint dir sets it aside."""
    _two_checkpoints(pstate, tmp_path)
    _truncate_distcp(tmp_path / "iter_0000002")
    assert make_trainer(pstate, seed=5).load(tmp_path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]
