"""A non-finite gradient on one pipeline stage skips the optimizer step on every rank (PP=2, 2 gloo ranks):
the last stage's loss and gradients are finite, so without the all-reduced flag it alone would step."""
import launcher
import torch

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from megatron_rence.megatron import parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective

VOCAB = 57
K = 2


def _skip_on_one_stage() -> dict:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8,
                            dtype="fp32")
    cfg.parallel = ParallelConfig(pp=2)
    cfg.objective = ObjectiveConfig(name="grpo")
    cfg.optim = OptimConfig(lr=1e-2)
    cfg.train.micro_batch_size, cfg.rollout.num_samples = 2 * K, K
    state = parallel.initialize(cfg.parallel, seed=3)
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), state, VOCAB)
    g = torch.Generator().manual_seed(2)
    seqs = [(torch.randint(1, VOCAB, (7,), generator=g).tolist(), 3) for _ in range(2 * K)]
    old = [v + 0.1 for v in trainer.logprobs(seqs, 1.0)]
    before = [p.detach().clone() for p in trainer.model_chunks[0].parameters()]
    handle = None
    if state.rank == 0:  # the first stage only: its gradients turn inf, the loss (last stage) stays finite
        param = next(trainer.model_chunks[0].parameters())
        handle = param.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    metrics = trainer.train_step(seqs, get_objective(cfg.objective), torch.tensor([1.0, 0.0, 0.0, 1.0]), old,
                                 group_size=K, normalizer=4.0)
    if handle is not None:
        handle.remove()
    unchanged = all(torch.equal(p, q) for p, q in zip(trainer.model_chunks[0].parameters(), before))
    after = trainer.train_step(seqs, get_objective(cfg.objective), torch.tensor([1.0, 0.0, 0.0, 1.0]), old,
                               group_size=K, normalizer=4.0)
    parallel.destroy()
    return {"nonfinite": metrics["train/nonfinite_steps"], "loss": metrics["loss/total"], "unchanged": unchanged,
            "next_nonfinite": after["train/nonfinite_steps"], "next_changed": after["train/weights_changed"]}


def test_a_nonfinite_gradient_on_one_stage_skips_the_step_on_every_rank():
    results = launcher.run(_skip_on_one_stage, 2, timeout=300)
    for rank, r in enumerate(results):
        assert r["nonfinite"] == 1.0 and r["unchanged"], (rank, r)
        assert r["next_nonfinite"] == 0.0 and r["next_changed"] == 1.0, (rank, r)
    assert torch.isfinite(torch.tensor(results[1]["loss"]))
