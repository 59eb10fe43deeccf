"""Non-finite steps: the trainer skips an optimizer step whose loss or gradient is NaN / inf (weights and LR
schedule untouched, counted in train/nonfinite_steps); RunHealth stops the run after
train.max_nonfinite_steps such steps in a row, naming the metric and the step, and reports a collapsed model."""
import math

import pytest
import torch

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig
from megatron_rence.health import NonFiniteTraining, RunHealth
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective
from megatron_rence.rollout.sampling import sample_next
from megatron_rence.rollout.types import SamplingParams
from tests.megatron_state import single_rank

VOCAB = 53
K = 2


@pytest.fixture(scope="module")
def pstate():
    with single_rank(seed=13) as state:
        yield state


def make_trainer(pstate) -> Trainer:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8,
                            dtype="fp32")
    cfg.objective = ObjectiveConfig(name="grpo")
    cfg.optim = OptimConfig(lr=1e-2, lr_warmup_steps=2)
    cfg.train.micro_batch_size, cfg.train.num_steps, cfg.rollout.num_samples = 2 * K, 8, K
    torch.manual_seed(0)
    return Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), pstate, VOCAB)


def run_step(t: Trainer, poison_old: bool = False) -> dict:
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(1, VOCAB, (7,), generator=g).tolist(), 3) for _ in range(2 * K)]
    old = [v + 0.1 for v in t.logprobs(seqs, 1.0)]
    if poison_old:
        old[1] = old[1].clone()
        old[1][0] = float("nan")
    return t.train_step(seqs, get_objective(t.cfg.objective), torch.tensor([1.0, 0.0, 0.0, 1.0]), old,
                        group_size=K, normalizer=4.0)


def weights(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model_chunks[0].parameters()]


def test_nan_loss_skips_the_update_and_the_schedule(pstate):
    t = make_trainer(pstate)
    before, lr_before, steps_before = weights(t), t.optimizer.param_groups[0]["lr"], t.scheduler.num_steps
    metrics = run_step(t, poison_old=True)
    assert math.isnan(metrics["loss/total"]) and metrics["train/nonfinite_steps"] == 1.0
    assert metrics["train/update_skipped"] == 1.0 and metrics["train/weights_changed"] == 0.0
    for x, y in zip(weights(t), before):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert t.scheduler.num_steps == steps_before and t.optimizer.param_groups[0]["lr"] == lr_before
    metrics = run_step(t)  # the next finite step trains normally, at the LR the skipped step would have used
    assert metrics["train/nonfinite_steps"] == 0.0 and metrics["train/lr"] == lr_before
    assert metrics["train/weights_changed"] == 1.0 and all(torch.isfinite(p).all() for p in weights(t))


def test_inf_gradient_with_a_finite_loss_skips_the_update(pstate):
    t = make_trainer(pstate)
    before = weights(t)
    param = next(t.model_chunks[0].parameters())
    handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    try:
        metrics = run_step(t)
    finally:
        handle.remove()
    assert math.isfinite(metrics["loss/total"]) and metrics["train/nonfinite_steps"] == 1.0
    assert math.isnan(metrics["train/grad_norm"])
    for x, y in zip(weights(t), before):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_health_stops_after_max_nonfinite_steps_in_a_row_naming_metric_and_step(capsys):
    health = RunHealth(max_nonfinite_steps=2)
    nan = float("nan")
    for step, loss in [(1, nan), (2, 0.5), (3, 0.4)]:  # a single skip, then recovery: the count restarts
        metrics = {"train/nonfinite_steps": float(step == 1), "loss/total": loss, "train/grad_norm": 1.0}
        health.observe(step, metrics)
        health.stop_if_diverged()
    assert metrics["train/nonfinite_steps_total"] == 1.0
    health.observe(4, {"train/nonfinite_steps": 1.0, "loss/total": 0.3, "train/grad_norm": float("inf")})
    health.stop_if_diverged()
    metrics = {"train/nonfinite_steps": 1.0, "loss/total": 0.3, "train/grad_norm": nan}
    health.observe(5, metrics)
    assert metrics["train/nonfinite_steps_total"] == 3.0
    with pytest.raises(NonFiniteTraining, match=r"step 5: train/grad_norm is nan: 2 optimizer steps in a row.*"
                                                r"train.max_nonfinite_steps=2"):
        health.stop_if_diverged()
    out = capsys.readouterr().out
    assert "step 1: loss/total=nan: optimizer step skipped" in out and "step 4: train/grad_norm=inf" in out


def test_health_reports_a_collapsed_gradient(capsys):
    health = RunHealth(max_nonfinite_steps=3)
    for step in range(1, 5):
        health.observe(step, {"train/grad_norm": 0.0, "train/num_response_tokens": 12.0, "loss/total": 0.0})
        health.stop_if_diverged()  # a warning, not an error
    out = capsys.readouterr().out
    assert out.count("train/grad_norm is exactly 0 for 3 steps in a row") == 1 and health.collapsed_since == 1


def test_engine_sampling_names_diverged_weights():
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(FloatingPointError, match="logits hold NaN / inf: its weights have diverged"):
        sample_next(logits, SamplingParams(temperature=1.0), None)


def test_end_of_run_summary_reports_skipped_steps_a_collapse_and_the_data_counts():
    from megatron_rence.train import summary

    cfg = Config()
    cfg.train.max_nonfinite_steps, cfg.logging.plot = 2, False
    data = {"data/num_prompts": 10, "data/num_dropped_too_long": 1, "data/num_dropped_oversized": 2,
            "data/num_malformed": 3}
    history = [{"step": s, "reward/mean": 0.0, "train/grad_norm": g, "train/num_response_tokens": 8.0,
                "train/nonfinite_steps_total": 1.0, **data} for s, g in [(1, 0.5), (2, 0.0), (3, 0.0)]]
    text = summary(cfg, history)
    assert "train/nonfinite_steps_total=1: optimizer steps skipped" in text
    assert "train/grad_norm was exactly 0 in the last 2 steps" in text
    assert "data: 10 prompts; dropped 1 longer than data.max_prompt_len=512 tokens, 2 lines over " \
           "data.max_record_bytes=1048576, 3 malformed (data.skip_malformed)" in text
    history[-1]["train/grad_norm"] = 0.1
    assert "collapsed" not in summary(cfg, history)


class _State:
    """The dataset / objective side of a checkpoint: whatever state_dict it gave comes back on load."""

    def __init__(self, state=None):
        self.state = dict(state or {})

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_nonfinite_counters_are_checkpointed_and_continue_after_a_resume(pstate, tmp_path):
    """Two skipped steps in a row, a checkpoint, a resume, one more skipped step: the run stops at
    max_nonfinite_steps=3 and the total says 3, as it would have without the interruption."""
    from types import SimpleNamespace

    from megatron_rence import train

    trainer = make_trainer(pstate)
    cfg = trainer.cfg
    cfg.train.run_dir, cfg.train.max_nonfinite_steps = str(tmp_path), 3
    health = RunHealth(max_nonfinite_steps=3)
    for step in (1, 2):
        health.observe(step, {"train/nonfinite_steps": 1.0, "loss/total": float("nan")})
    run = SimpleNamespace(cfg=cfg, trainer=trainer, dataset=_State({"index": 2}), objective=_State(), health=health,
                          pstate=pstate)
    train.save(run, 2)
    resumed = RunHealth(max_nonfinite_steps=3)
    step, loaded = train.resume_from(tmp_path / "checkpoints", cfg, trainer, None, _State(), _State(), resumed)
    assert (step, loaded) == (2, str(tmp_path / "checkpoints" / "iter_0000002"))
    metrics = {"train/nonfinite_steps": 1.0, "loss/total": float("nan")}
    resumed.observe(3, metrics)
    assert metrics["train/nonfinite_steps_total"] == 3.0
    with pytest.raises(NonFiniteTraining, match="step 3: .*3 optimizer steps in a row"):
        resumed.stop_if_diverged()
