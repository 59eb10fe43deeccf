"""Packed THD microbatches (train.packing, token budget) give the padded path's per-token log-probs, gradients and
optimizer step at TP=1 (DP=4), TP=2+SP, PP=2+VPP=2 (variable sequence lengths between stages) and CP=2
(LocalCoreAttention all-gathers K/V over the CP group), on 4 gloo ranks.

Per layout, the padded trainer (train.packing=false, the reference) and the packed trainer start from the same
weights (same seed, same layout). The token budget is small, so ranks hold different numbers of groups and
microbatches of different lengths, and some ranks run filler microbatches.
"""
import launcher
import torch

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from megatron_rence.megatron import parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer
from megatron_rence.objectives import get_objective

VOCAB = 57
K = 2
TEMPERATURE = 0.9
LAYOUTS = [dict(), dict(tp=2, sequence_parallel=True), dict(pp=2, vpp=2), dict(cp=2)]
BUDGET = 40  # tokens per microbatch: one to three groups


def make_cfg(layout: dict, packed: bool) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=64, make_vocab_size_divisible_by=8,
                            tie_word_embeddings=True, dtype="fp32")
    cfg.parallel = ParallelConfig(**layout)
    cfg.objective = ObjectiveConfig(name="rence", kl_coef=0.1, beta=0.5)
    cfg.optim = OptimConfig(lr=3e-3, clip_grad=0.5, weight_decay=0.0)
    cfg.train.micro_batch_size = 2 * K
    cfg.train.packing = packed
    cfg.train.max_tokens_per_microbatch = BUDGET if packed else 0
    cfg.rollout.num_samples, cfg.rollout.temperature = K, TEMPERATURE
    return cfg


def make_batch():
    g = torch.Generator().manual_seed(7)
    seqs = []
    for _ in range(7 * K):
        prompt_len, response_len = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 15, (1,), generator=g))
        seqs.append((torch.randint(1, VOCAB, (prompt_len + response_len,), generator=g).tolist(), prompt_len))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    return seqs, rewards, g


def _run(layout: dict, packed: bool, seqs, rewards, g_state) -> dict:
    cfg = make_cfg(layout, packed)
    state = parallel.initialize(cfg.parallel, seed=31)
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), state, VOCAB)
    before = trainer.logprobs(seqs, TEMPERATURE)
    g = torch.Generator()
    g.set_state(g_state)
    old = [v + 0.2 * torch.randn(v.shape, generator=g) for v in before]
    ref = [v + 0.1 * torch.randn(v.shape, generator=g) for v in before]
    objective = get_objective(cfg.objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    m = trainer.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer)
    grads = [p.main_grad.detach().clone() for chunk in trainer.model for p in chunk.module.parameters()]
    after = trainer.logprobs(seqs, TEMPERATURE)
    return {"before": before, "after": after, "grads": grads, "metrics": m}


def _world4() -> dict:
    torch.set_num_threads(1)
    seqs, rewards, g = make_batch()
    g_state = g.get_state()
    out = {}
    for layout in LAYOUTS:
        padded = _run(layout, False, seqs, rewards, g_state)
        packed = _run(layout, True, seqs, rewards, g_state)
        diff = lambda a, b: max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))  # noqa: E731
        out[str(layout)] = {
            "before": diff(packed["before"], padded["before"]),
            "grads": diff(packed["grads"], padded["grads"]),
            "grad_scale": max(x.abs().max().item() for x in padded["grads"]),
            "after": diff(packed["after"], padded["after"]),
            "moved": diff(padded["after"], padded["before"]),
            "loss": (packed["metrics"]["loss/total"], padded["metrics"]["loss/total"]),
            "grad_norm": (packed["metrics"]["train/grad_norm"], padded["metrics"]["train/grad_norm"]),
            "num_sequences": packed["metrics"]["train/num_sequences"],
            "microbatches": (packed["metrics"]["train/num_microbatches"],
                             padded["metrics"]["train/num_microbatches"]),
            "computed": (packed["metrics"]["train/num_tokens_computed"],
                         padded["metrics"]["train/num_tokens_computed"]),
        }
    parallel.destroy()
    return out


def test_packed_equals_padded_across_layouts():
    per_rank = launcher.run(_world4, 4, timeout=600)
    for rank, out in enumerate(per_rank):
        for layout in map(str, LAYOUTS):
            r = out[layout]
            assert r["before"] < 1e-5 and r["after"] < 1e-5, (layout, rank, r)  # per-token log-probs
            assert r["grads"] < 1e-5 * max(1.0, r["grad_scale"]), (layout, rank, r)  # local gradient shards
            assert r["moved"] > 1e-3, (layout, rank, r)  # the step changed the log-probs it compares
            packed_loss, padded_loss = r["loss"]
            assert abs(packed_loss - padded_loss) < 1e-6 * max(1.0, abs(padded_loss)), (layout, rank, r)
            assert abs(r["grad_norm"][0] - r["grad_norm"][1]) < 1e-5 * r["grad_norm"][1], (layout, rank, r)
            assert r["num_sequences"] == 14, (layout, r)  # every sequence trained exactly once
            assert r["computed"][0] < r["computed"][1], (layout, r)  # packing computes fewer tokens
