"""Issue 28 item 7: `--resume` applies the recipe's changed optim.* settings (and says which), instead of
megatron's checkpointed scheduler and parameter groups silently keeping the old ones; a resumed run whose
learning rate is 0 for the steps left says so."""
import copy

import pytest
import torch

from megatron_rence.config import Config, OptimConfig
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.optim import current_lr, lr_at
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective
from tests.megatron_state import single_rank, tiny_grpo_config

VOCAB, K = 53, 2


@pytest.fixture(scope="module")
def pstate():
    with single_rank(seed=11) as state:
        yield state


def base_cfg() -> Config:
    return tiny_grpo_config(K)


def trainer(pstate, cfg: Config, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    return Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), pstate, VOCAB)


def train(t: Trainer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    seqs = [(torch.randint(1, VOCAB, (7,), generator=g).tolist(), 3) for _ in range(2 * K)]
    old = [v + 0.1 for v in t.logprobs(seqs, 1.0)]
    t.train_step(seqs, get_objective(t.cfg.objective), torch.tensor([1.0, 0.0, 0.0, 1.0]), old, group_size=K,
                 normalizer=4.0)


def saved_after_two_steps(pstate, tmp_path, cfg: Config) -> Trainer:
    t = trainer(pstate, cfg)
    train(t, 1)
    train(t, 2)
    t.save(tmp_path, 2, {"step": 2})
    return t


def test_changed_optim_settings_apply_on_resume_and_are_named(pstate, tmp_path, capsys):
    saved_after_two_steps(pstate, tmp_path, base_cfg())
    capsys.readouterr()
    cfg = base_cfg()
    cfg.optim.lr, cfg.optim.adam_beta1, cfg.optim.adam_eps, cfg.optim.weight_decay = 5e-2, 0.5, 1e-3, 0.0
    cfg.train.num_steps = 20  # the decay length follows the run's length (optim.lr_decay_steps unset)
    resumed = trainer(pstate, cfg, seed=3)
    resumed.load(tmp_path)
    out = capsys.readouterr().out
    for line in ["optim.lr: 0.01 in the checkpoint, 0.05 in the recipe: the recipe's value applies from step 3",
                 "optim.adam_beta1: 0.9 in the checkpoint, 0.5 in the recipe",
                 "optim.adam_eps: 1e-08 in the checkpoint, 0.001 in the recipe",
                 "optim.weight_decay: 0.1 in the checkpoint, 0.0 in the recipe",
                 "optim.lr_decay_steps (default: the run's optimizer steps): 8 in the checkpoint, 20 in the recipe"]:
        assert f"resume: {line}" in out, out
    assert "adam_beta2" not in out and "min_lr" not in out  # unchanged settings are not listed
    # optimizer step 3 runs at the new schedule's lr(3); Adam uses the new betas / eps, no weight decay
    assert current_lr(resumed.optimizer) == pytest.approx(lr_at(cfg.optim, 3, 20), rel=1e-12)
    for group in resumed.optimizer.param_groups:
        assert group["betas"] == (0.5, 0.999) and group["eps"] == 1e-3 and group["weight_decay"] == 0.0
    train(resumed, 3)
    assert current_lr(resumed.optimizer) == pytest.approx(lr_at(cfg.optim, 4, 20), rel=1e-12)
    resumed.save(tmp_path / "again", 3, {"step": 3})  # the new settings are what the next checkpoint holds
    again = trainer(pstate, cfg, seed=4)
    again.load(tmp_path / "again")
    assert "resume:" not in capsys.readouterr().out


def test_unchanged_settings_resume_exactly(pstate, tmp_path, capsys):
    cfg = base_cfg()
    original = saved_after_two_steps(pstate, tmp_path, cfg)
    resumed = trainer(pstate, copy.deepcopy(cfg), seed=5)
    resumed.load(tmp_path)
    assert "resume:" not in capsys.readouterr().out
    for t in (original, resumed):
        train(t, 3)
    assert current_lr(resumed.optimizer) == current_lr(original.optimizer)
    for a, b in zip(original.model_chunks[0].parameters(), resumed.model_chunks[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resumed_run_whose_lr_decayed_to_zero_warns(pstate, tmp_path, capsys):
    cfg = base_cfg()
    cfg.optim = OptimConfig(lr=1e-2, lr_decay_style="linear", lr_decay_steps=2, min_lr=0.0)
    saved_after_two_steps(pstate, tmp_path, cfg)
    longer = copy.deepcopy(cfg)
    longer.train.num_steps = 6  # extended, but optim.lr_decay_steps=2 still ends the decay at step 2
    resumed = trainer(pstate, longer, seed=6)
    resumed.load(tmp_path)
    out = capsys.readouterr().out
    assert current_lr(resumed.optimizer) == 0.0
    assert ("warning: optim: the learning rate of optimizer step 3 and after is 0 (optim.lr=0.01, "
            "optim.lr_decay_style=linear reaches optim.min_lr=0.0 at optimizer step 2)") in out, out
    longer.optim.lr_decay_steps = None  # the decay now spans the 6 steps: step 3 trains again, no warning
    resumed = trainer(pstate, longer, seed=6)
    resumed.load(tmp_path)
    out = capsys.readouterr().out
    assert "warning" not in out and current_lr(resumed.optimizer) == pytest.approx(lr_at(longer.optim, 3, 6))
    assert "optim.lr_decay_steps (default: the run's optimizer steps): 2 in the checkpoint, 6 in the recipe" in out
