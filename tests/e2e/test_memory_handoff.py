"""The colocated memory lifecycle of a real (tiny, CPU) training loop, as recorded calls: the engine starts and
rests before the trainer allocates; every step runs offload -> resume weights -> sync -> (offload params) ->
resume KV -> generate -> release -> restore, also around an engine restart and after --resume.

The engine is the real CPU (transformers) engine wrapped by a recorder that also fakes one restart: a GPU
engine's crash cannot happen here. The hand-off's calls are the real ones (megatron's grad-buffer and
optimizer offload run on CPU; the gradient buffers are really freed and reallocated)."""
import json
from pathlib import Path

import pytest

from megatron_rence.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]

SYNC = ["offload", "resume:weights", "update_weights", "offload_params", "resume:kv_cache"]
STEP = ["generate", "release", "restore"] + SYNC


class RecordingEngine:
    """Forwards to a real engine and appends each lifecycle call to `log`; generate call number
    `restart_on_call` raises EngineRestartedError instead (as an SGLang engine that restarted with dummy weights)."""

    def __init__(self, inner, log: list, restart_on_call: int = 0):
        self.inner, self.log, self.restart_on_call, self.num_generate = inner, log, restart_on_call, 0

    def generate(self, prompts, params, n):
        from megatron_rence.rollout.engine import EngineRestartedError

        self.num_generate += 1
        if self.num_generate == self.restart_on_call:
            self.log.append("generate:restarted")
            raise EngineRestartedError("recorded test: the engine restarted")
        self.log.append("generate")
        return self.inner.generate(prompts, params, n)

    def update_weights(self, bucket, version):
        if self.log[-1] != "update_weights":  # one entry per sync, however many buckets
            self.log.append("update_weights")
        self.inner.update_weights(bucket, version)

    def release_memory(self):
        self.log.append("release")
        self.inner.release_memory()

    def resume_memory(self, tags=None):
        self.log.append("resume:" + ",".join(tags))
        self.inner.resume_memory(tags)

    def __getattr__(self, name):  # weight_version, health, shutdown, named_weight
        return getattr(self.inner, name)


@pytest.fixture
def recorded(monkeypatch):
    """Patch build_engine, Trainer construction and the hand-off so that every call lands in one list."""
    from megatron_rence.megatron import offload, step
    from megatron_rence.rollout import engine as engine_module

    log: list = []
    settings = {"restart_on_call": 0}
    real_build = engine_module.build_engine

    def build_engine(cfg, hf_config, tokenizer, group=None):
        log.append("build_engine")
        return RecordingEngine(real_build(cfg, hf_config, tokenizer, group), log, settings["restart_on_call"])

    monkeypatch.setattr(engine_module, "build_engine", build_engine)
    real_init = step.Trainer.__init__

    def init(self, *args, **kwargs):
        log.append("trainer")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(step.Trainer, "__init__", init)
    for name in ("offload", "offload_params", "restore"):
        def recording(self, _real=getattr(offload.MemoryHandoff, name), _name=name):
            log.append(_name)
            return _real(self)
        monkeypatch.setattr(offload.MemoryHandoff, name, recording)
    return log, settings


def _cfg(run_dir, num_steps: int):
    return load_recipe(REPO / "recipes/demo_cpu.yaml", [
        f"train.run_dir={run_dir}", f"train.num_steps={num_steps}", "checkpoint.every=0", "model.dtype=bf16",
        "train.offload_params=true", "rollout.prompts_per_step=4", "rollout.num_samples=4",
        "train.global_batch_size=16", "train.micro_batch_size=8", "logging.tensorboard=false",
        "logging.progress_bar=false", "logging.plot=false", "reward.num_workers=1"])


def _train(cfg, resume: bool = False) -> list[dict]:
    from megatron_rence import train
    from tests.megatron_state import cpu_compat_restored

    with cpu_compat_restored():
        return train.run_training(cfg, resume=resume)


def test_lifecycle_order_every_step_with_a_restart_and_a_resume(recorded, tmp_path):
    log, settings = recorded
    settings["restart_on_call"] = 2  # step 2's first generate: the engine restarted
    history = _train(_cfg(tmp_path, num_steps=3))
    assert [h["engine/restarts"] for h in history] == [0.0, 1.0, 0.0]
    setup = ["build_engine", "release", "trainer"]  # the engine rests before the trainer allocates
    restarted = ["generate:restarted"] + SYNC  # re-sync of the step's starting weights, then the step again
    assert log == setup + SYNC + STEP + restarted + STEP + STEP
    # each step reports the hand-off's metrics (0 GiB of GPU memory on CPU, the calls' seconds)
    for h in history:
        assert h["perf/offload_s"] >= 0 and h["perf/restore_s"] >= 0 and h["memory/offloaded_allocated_gib"] == 0.0
        assert h["memory/grad_buffers_freed_gib"] > 0  # megatron's grad buffers are really freed on CPU too
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("perf/restore_s" in r for r in records)

    log.clear()
    settings["restart_on_call"] = 0
    history = _train(_cfg(tmp_path, num_steps=4), resume=True)
    assert [h["step"] for h in history] == [4]
    assert log == setup + SYNC + STEP
