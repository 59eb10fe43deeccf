"""Step glue (phases.py): which ranks serve which engine and receive weights; an engine that restarted with
dummy weights makes the rollout phase ask for a re-sync instead of returning its samples."""
import pytest
import torch

from megatron_rence.config import Config
from megatron_rence.data.prompts import Prompt
from megatron_rence.phases import (HandoffBarrier, engine_feed_ranks, engine_groups, engine_layout, rollout_phase,
                                   wait_for_every_engine)
from megatron_rence.rewards.math import GradeResult
from megatron_rence.rollout.engine import EngineRestartedError
from megatron_rence.rollout.types import Completion, SamplingParams


def sglang_cfg(tp: int) -> Config:
    cfg = Config()
    cfg.rollout.engine, cfg.rollout.sglang.tp = "sglang", tp
    return cfg


def test_engine_groups_and_feed_ranks():
    hf = Config()
    assert engine_groups(hf, 4) == [[0]] and engine_feed_ranks(hf, 4) == [0]
    assert [engine_layout(hf, r, 4)[0] for r in range(4)] == [0, None, None, None]
    cfg = sglang_cfg(2)
    assert engine_groups(cfg, 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert engine_feed_ranks(cfg, 8) == list(range(8))  # every rank hands its GPU copy to its engine
    assert [engine_layout(cfg, r, 8)[0] for r in range(8)] == [0, None, 1, None, 2, None, 3, None]
    with pytest.raises(ValueError, match="rollout.sglang.tp=3"):
        engine_groups(sglang_cfg(3), 8)


class FakeEngine:
    """Test double for the rollout engine protocol: answers "1" to everything, or raises as a restarted engine."""

    def __init__(self, restarted: bool):
        self.restarted = restarted

    def generate(self, prompts, params, n):
        if self.restarted:
            raise EngineRestartedError("dummy weights")
        return [[Completion([5, 2], [-0.1, -0.2], "stop", 0, "1") for _ in range(n)] for _ in prompts]


class FakePool:
    def grade(self, texts, answers):
        return [GradeResult(float(t == a), t, "ok") for t, a in zip(texts, answers)]


def test_rollout_phase_grades_and_restart_asks_for_resync():
    prompts = [Prompt(str(i), f"{i}+0=", [3, 4], str(i)) for i in range(3)]
    params = SamplingParams(max_new_tokens=2)
    exp, metrics = rollout_phase(prompts, FakeEngine(False), FakePool(), params, 2, 0, 1, 0.5)
    assert exp is not None and metrics["reward/mean"] == pytest.approx(1 / 3)  # only "1" is right
    assert [len(c) for c in exp.completions] == [2, 2, 2]
    exp, metrics = rollout_phase(prompts, FakeEngine(True), FakePool(), params, 2, 0, 1, 0.5)
    assert exp is None and metrics == {"engine/restarts": 1.0}


class AlternatingEngine:
    """Sample j of every prompt answers "1" when j is even, "0" when odd; log-probs -0.1, -0.2 per token."""

    def generate(self, prompts, params, n):
        return [[Completion([5, 2], [-0.1, -0.2], "stop", 0, str(1 - j % 2)) for j in range(n)] for _ in prompts]


class RecordingTrainer:
    """Test double for the Trainer: old log-probs -0.5 per token; records what train_step receives."""

    def __init__(self):
        self.logprob_calls, self.old, self.rollout = 0, [], []

    def logprobs(self, sequences, temperature):
        self.logprob_calls += 1
        return [torch.full((len(t) - p,), -0.5) for t, p in sequences]

    def train_step(self, sequences, objective, rewards, old_logprobs, ref_logprobs, group_size, normalizer,
                   rollout_logprobs=None):
        self.old.append(old_logprobs)
        self.rollout.append(rollout_logprobs)
        return {"loss/total": 1.0}


@pytest.mark.parametrize("source", ["trainer", "engine"])
def test_old_logprobs_come_from_the_trainer_or_the_engine(source):
    from megatron_rence.objectives import get_objective
    from megatron_rence.phases import train_phase

    cfg = Config()
    cfg.train.old_logprobs = source
    prompts = [Prompt(str(i), f"{i}+0=", [3, 4], "1") for i in range(2)]
    exp, _ = rollout_phase(prompts, AlternatingEngine(), FakePool(), SamplingParams(max_new_tokens=2), 4, 0, 1, 0.5)
    trainer = RecordingTrainer()
    metrics = train_phase(exp, trainer, None, get_objective(cfg.objective), cfg)
    assert metrics["train/skipped"] == 0.0 and len(trainer.old) == 1 and len(trainer.old[0]) == 8
    if source == "engine":
        assert trainer.logprob_calls == 0 and "mismatch/abs_mean" not in metrics
        assert all(v.tolist() == pytest.approx([-0.1, -0.2]) for v in trainer.old[0])
    else:
        assert trainer.logprob_calls == 1 and metrics["mismatch/abs_mean"] == pytest.approx(0.35)  # |.4|, |.3|
        assert all(v.tolist() == [-0.5, -0.5] for v in trainer.old[0])


def test_tis_passes_the_engines_logprobs_next_to_the_trainers():
    from megatron_rence.objectives import get_objective
    from megatron_rence.phases import train_phase

    cfg = Config()
    cfg.objective.name, cfg.objective.tis_cap = "grpo", 2.0
    prompts = [Prompt(str(i), f"{i}+0=", [3, 4], "1") for i in range(2)]
    exp, _ = rollout_phase(prompts, AlternatingEngine(), FakePool(), SamplingParams(max_new_tokens=2), 4, 0, 1, 0.5)
    trainer = RecordingTrainer()
    train_phase(exp, trainer, None, get_objective(cfg.objective), cfg)
    assert trainer.logprob_calls == 1 and all(v.tolist() == [-0.5, -0.5] for v in trainer.old[0])
    assert len(trainer.rollout[0]) == 8 and all(v.tolist() == pytest.approx([-0.1, -0.2]) for v in trainer.rollout[0])
    cfg.objective.tis_cap = None
    trainer = RecordingTrainer()
    train_phase(exp, trainer, None, get_objective(cfg.objective), cfg)
    assert trainer.rollout == [None]


def test_handoff_barrier_without_a_group_waits_for_nobody():
    """One rank feeds the engine (or none): nothing to wait for, no process group needed (the 4-rank order is
    tests/distributed/test_handoff_order.py)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    barrier = HandoffBarrier(None)
    barrier()
    wait_for_every_engine()  # single process: returns at once
    assert barrier.metrics() == {"perf/handoff_wait_s": 0.0}
    barrier.wait_s = 1.5
    assert barrier.metrics() == {"perf/handoff_wait_s": 1.5} and barrier.wait_s == 0.0  # per step: reset
