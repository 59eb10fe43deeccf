"""megatron/offload.py on a real bf16 Trainer (CPU): megatron's grad buffers are freed and come back zeroed, the
optimizer's fp32 main params and Adam moments survive a round trip bitwise, a step after the round trip equals
a step without it, and the calls are idempotent. (Optimizer state and parameters have nowhere to move on CPU;
benchmarks/bench_offload.py measures the GPU side.)"""
import pytest
import torch

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.offload import MemoryHandoff
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective
from tests.megatron_state import single_rank

VOCAB, K = 61, 4


@pytest.fixture(scope="module")
def pstate():
    with single_rank(seed=3) as state:
        yield state


def make_trainer(pstate, lr: float = 1e-2) -> Trainer:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=64, make_vocab_size_divisible_by=8,
                            dtype="bf16")
    cfg.objective = ObjectiveConfig(name="rence")
    cfg.optim = OptimConfig(lr=lr, clip_grad=0.0)
    cfg.rollout.num_samples = K
    cfg.train.micro_batch_size = K
    cfg.train.num_steps = 10
    return Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), pstate, VOCAB)


def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(1, VOCAB, (12,), generator=g).tolist(), 4) for _ in range(2 * K)]
    return seqs, torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])


def train(trainer, seqs, rewards):
    objective = get_objective(trainer.cfg.objective)
    old = [torch.zeros(len(t) - p) for t, p in seqs]
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(o) for o in old])
    return trainer.train_step(seqs, objective, rewards, old, group_size=K, normalizer=normalizer)


def optimizer_tensors(trainer) -> list[torch.Tensor]:
    (part,) = trainer.optimizer.chained_optimizers
    out = [p.detach().clone() for group in part.optimizer.param_groups for p in group["params"]]
    for state in part.optimizer.state.values():
        out += [v.detach().clone() for _, v in sorted(state.items())]
    return out


def test_round_trip_keeps_state_and_the_next_step(pstate):
    seqs, rewards = batch()
    trainer, twin = make_trainer(pstate), make_trainer(pstate)
    twin.copy_weights_from(trainer)
    assert trainer.precision() == "params=bf16 main_params=fp32"
    train(trainer, seqs, rewards), train(twin, seqs, rewards)  # Adam state exists
    before = optimizer_tensors(trainer)
    assert len(before) > 2 * len(list(trainer.model_chunks[0].parameters()))  # main params + moments

    handoff = MemoryHandoff(trainer, None, offload_params=True)
    grad_bytes = sum(b.grad_data.untyped_storage().nbytes() for c in trainer.model for b in c.buffers)
    metrics = handoff.offload()
    assert all(b.grad_data.untyped_storage().nbytes() == 0 for c in trainer.model for b in c.buffers)
    assert metrics["memory/grad_buffers_freed_gib"] * 1024 ** 3 == grad_bytes > 0
    assert metrics["memory/optimizer_offloaded_gib"] == 0.0  # nothing lives on a GPU here
    assert "memory/grad_buffers_freed_gib" not in handoff.offload()  # idempotent: a restart re-sync moves nothing
    assert "memory/params_offloaded_gib" in handoff.offload_params()
    assert "memory/params_offloaded_gib" not in handoff.offload_params()  # already offloaded
    assert "perf/restore_s" in handoff.restore()
    for chunk in trainer.model:
        for buffer in chunk.buffers:
            assert buffer.grad_data.untyped_storage().nbytes() > 0 and not buffer.grad_data.any()
    after = optimizer_tensors(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after))

    train(trainer, seqs, rewards), train(twin, seqs, rewards)
    for p, q in zip(trainer.model_chunks[0].parameters(), twin.model_chunks[0].parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(a, b) for a, b in zip(before, optimizer_tensors(trainer)))  # the step did train


def test_copy_weights_reloads_the_main_params(pstate):
    """bf16: without reload_model_params the next step would write the target's old fp32 main params back."""
    seqs, rewards = batch()
    source, target = make_trainer(pstate), make_trainer(pstate, lr=0.0)
    target.copy_weights_from(source)
    train(target, seqs, rewards)
    for p, q in zip(target.model_chunks[0].parameters(), source.model_chunks[0].parameters()):
        assert torch.equal(p, q)


def test_pinned_offload_moves_nothing_on_cpu():
    """CPU tensors stay where they are (nothing to free) and no CUDA call is made; GPU: tests/gpu/test_offload_pinned."""
    from megatron_rence.megatron.offload import PinnedOffload

    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones_like(p)
    opt.step()
    holder = type("Holder", (), {})()
    holder.optimizer = opt
    ptr, moments = p.data_ptr(), dict(opt.state[p])
    pinned = PinnedOffload()
    pinned.offload(holder)
    pinned.restore()
    assert p.data_ptr() == ptr and all(opt.state[p][k] is v for k, v in moments.items())
