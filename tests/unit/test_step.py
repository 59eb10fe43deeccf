"""Trainer (one process): the gradient is that of objective(whole batch, normalizer) however the batch is split,
microbatch planning over data-parallel ranks, input validation, and the LR schedule's hand-computed values."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_rence.config import Config, ConfigError, ModelConfig, ObjectiveConfig, OptimConfig
from megatron_rence.megatron import logprobs, optim, packing
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer, batch_width, plan_microbatches, scatter_response
from megatron_rence.objectives import ObjectiveBatch, get_objective
from tests.megatron_state import single_rank

VOCAB = 61
K = 4  # group size
MODEL = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    max_position_embeddings=64, make_vocab_size_divisible_by=8, dtype="fp32")


@pytest.fixture(scope="module")
def pstate():
    with single_rank(seed=5) as state:
        yield state


def make_cfg(micro_batch_size: int, objective: str = "rence", **optim_fields) -> Config:
    cfg = Config()
    cfg.model = MODEL
    cfg.objective = ObjectiveConfig(name=objective, kl_coef=0.05 if objective == "grpo" else 0.0)
    cfg.optim = OptimConfig(lr=1e-3, clip_grad=0.0, **optim_fields)
    cfg.train.micro_batch_size = micro_batch_size
    cfg.train.num_steps = 10
    cfg.rollout.num_samples = K
    cfg.rollout.temperature = 0.9
    return cfg


def batch(num_groups: int = 4, seed: int = 0):
    """Sequences of varying prompt/response lengths, binary rewards with mixed groups, perturbed old/ref log-probs."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(num_groups * K):
        prompt_len = int(torch.randint(2, 6, (1,), generator=g))
        response_len = int(torch.randint(1, 9, (1,), generator=g))
        seqs.append((torch.randint(1, VOCAB, (prompt_len + response_len,), generator=g).tolist(), prompt_len))
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
                           * (num_groups // 4 + 1))[:num_groups].reshape(-1)
    return seqs, rewards, g


def trainer(cfg: Config, pstate, source=None) -> Trainer:
    t = Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), pstate, VOCAB)
    if source is not None:
        t.copy_weights_from(source)
    return t


def perturbed(values, g, scale=0.3):
    return [v + scale * torch.randn(v.shape, generator=g) for v in values]


def reference_grads(cfg, source: Trainer, seqs, rewards, old, ref, objective, normalizer, rollout=None):
    """Gradient of objective(whole batch, normalizer) by a plain forward/backward of an unwrapped copy."""
    model = build_model(cfg.model, cfg.parallel, VOCAB)[0]
    with torch.no_grad():
        for p, q in zip(model.parameters(), source.model_chunks[0].parameters()):
            p.copy_(q)
    whole = packing.pad_batch(seqs, 0)
    token_lp = logprobs.logprobs_from_logits(model(whole.tokens, whole.position_ids, None), whole, None,
                                             cfg.rollout.temperature, VOCAB)
    width, prompt_lens = whole.tokens.shape[1], [p for _, p in seqs]
    mb = ObjectiveBatch(token_lp, scatter_response(old, prompt_lens, width), whole.loss_mask, rewards, K,
                        scatter_response(ref, prompt_lens, width) if ref is not None else None,
                        scatter_response(rollout, prompt_lens, width) if rollout is not None else None)
    loss, _ = objective(mb, normalizer)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed, budget", [(False, 0), (True, 1), (True, 80), (True, 10_000)])
def test_packed_token_budget_gives_the_whole_batch_gradient(pstate, packed, budget):
    """train.packing with microbatches of whole groups by token budget (1: one group each; 80: two or three; 10000: all in one)
    and the padded path give the whole-batch gradient; the log-prob pass gives the padded pass's values."""
    seqs, rewards, g = batch()
    cfg = make_cfg(K)
    base = trainer(cfg, pstate)
    cfg.train.packing = False
    want_lp = base.logprobs(seqs, 0.9)
    old, ref = perturbed(want_lp, g), perturbed(want_lp, g, 0.2)
    objective = get_objective(cfg.objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    want_loss, want = reference_grads(cfg, base, seqs, rewards, old, ref, objective, normalizer)
    cfg = make_cfg(K + 1 if budget else K)  # a token budget ignores micro_batch_size (not even a multiple of K)
    cfg.train.packing, cfg.train.max_tokens_per_microbatch = packed, budget
    t = trainer(cfg, pstate, source=base)
    for a, b in zip(t.logprobs(seqs, 0.9), want_lp):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    metrics = t.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer)
    group_tokens = [sum(len(s) for s, _ in seqs[i:i + K]) for i in range(0, len(seqs), K)]
    expected_mbs = {0: 4, 1: 4, 10_000: 1}.get(budget) or len(packing.plan_token_budget(group_tokens, budget, 1)[0])
    assert 1 < expected_mbs < 4 or budget != 80
    assert metrics["train/num_microbatches"] == expected_mbs
    assert metrics["loss/total"] == pytest.approx(want_loss, rel=1e-5)
    if packed:  # packing computes the real tokens only (no TP/CP multiple here)
        assert metrics["train/num_tokens_computed"] == sum(len(s) for s, _ in seqs)
    for name, p in t.model_chunks[0].named_parameters():
        torch.testing.assert_close(p.main_grad, want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("objective_name", ["rence", "grpo", "dapo", "online_dpo"])
def test_microbatch_split_gives_the_whole_batch_gradient_and_update(pstate, objective_name):
    seqs, rewards, g = batch()
    base = trainer(make_cfg(K, objective_name), pstate)
    old = perturbed(base.logprobs(seqs, 0.9), g)
    ref = perturbed(base.logprobs(seqs, 0.9), g, 0.2)
    objective = get_objective(make_cfg(K, objective_name).objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    want_loss, want = reference_grads(base.cfg, base, seqs, rewards, old, ref, objective, normalizer)
    params = {}
    for mbs in (K, 2 * K, len(seqs)):  # 4 microbatches, 2, the whole batch in one
        t = trainer(make_cfg(mbs, objective_name), pstate, source=base)
        metrics = t.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer)
        assert metrics["train/num_microbatches"] == len(seqs) // mbs
        assert metrics["loss/total"] == pytest.approx(want_loss, rel=1e-5)
        assert metrics["train/num_sequences"] == len(seqs)
        for (name, p) in t.model_chunks[0].named_parameters():
            torch.testing.assert_close(p.main_grad, want[name], rtol=1e-5, atol=1e-7, msg=f"{mbs}: {name}")
        params[mbs] = [p.detach().clone() for p in t.model_chunks[0].parameters()]
        assert metrics["train/weights_changed"] == 1.0
    for mbs in (2 * K, len(seqs)):
        for a, b in zip(params[K], params[mbs]):
            # Adam step 1 is ~lr*g/(|g|+eps): entries with |g| near eps amplify rounding (one in ~2000 moved
            # 2e-6 under another thread count); 5e-6 = 0.5% of lr. The gradients above are the exact check.
            torch.testing.assert_close(a, b, rtol=0, atol=5e-6)


def test_tis_rollout_logprobs_reach_every_microbatch(pstate):
    """GRPO with objective.tis_cap: the engine's log-probs are split with the rows, so two microbatches give
    the whole-batch gradient; without them train_step refuses."""
    seqs, rewards, g = batch()
    base = trainer(make_cfg(K, "grpo"), pstate)
    old = perturbed(base.logprobs(seqs, 0.9), g)
    ref = perturbed(base.logprobs(seqs, 0.9), g, 0.2)  # make_cfg gives grpo a KL term
    rollout = perturbed(old, g, 0.5)  # some weights above the cap, some below 1
    cfg = make_cfg(2 * K, "grpo")
    cfg.objective.tis_cap = 1.5
    objective = get_objective(cfg.objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    want_loss, want = reference_grads(base.cfg, base, seqs, rewards, old, ref, objective, normalizer, rollout)
    _, plain = reference_grads(base.cfg, base, seqs, rewards, old, ref, get_objective(make_cfg(K, "grpo").objective),
                               normalizer)
    assert any(not torch.allclose(want[n], plain[n]) for n in want)  # the weights matter
    t = trainer(cfg, pstate, source=base)
    metrics = t.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer, rollout_logprobs=rollout)
    assert metrics["loss/total"] == pytest.approx(want_loss, rel=1e-5)
    assert 0 < metrics["objective/tis_clip_frac"] < 1
    for name, p in t.model_chunks[0].named_parameters():
        torch.testing.assert_close(p.main_grad, want[name], rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="needs rollout_logprobs"):
        t.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer)
    with pytest.raises(ValueError, match=r"rollout_logprobs\[0\] has 1 values"):
        t.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer,
                     rollout_logprobs=[torch.zeros(1)] + rollout[1:])


def test_logprobs_match_the_unwrapped_model(pstate):
    seqs, _, _ = batch(2)
    t = trainer(make_cfg(K), pstate)
    got = t.logprobs(seqs, temperature=0.7)
    whole = packing.pad_batch(seqs, 0)
    with torch.no_grad():
        logits = t.model_chunks[0](whole.tokens, whole.position_ids, None)
    want = whole.response_logprobs(torch.log_softmax(logits[..., :VOCAB].float() / 0.7, -1)
                                   .gather(-1, whole.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1))
    assert [len(v) for v in got] == [len(s) - p for s, p in seqs]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_step_lowers_the_loss_and_follows_the_lr_schedule(pstate):
    seqs, rewards, _ = batch(2)
    cfg = make_cfg(2 * K, lr_warmup_steps=2, lr_decay_style="linear", min_lr=0.0)
    cfg.optim.lr = 1e-2
    t = trainer(cfg, pstate)
    objective = get_objective(cfg.objective)
    old = t.logprobs(seqs, 0.9)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    losses, lrs = [], []
    for _ in range(3):
        m = t.train_step(seqs, objective, rewards, old, group_size=K, normalizer=normalizer)
        losses.append(m["loss/total"])
        lrs.append(m["train/lr"])
    # decay to 0 at step 10 (train.num_steps x 1 optimizer step per rollout): 1/2, 1, then 1 - 1/8
    assert lrs == pytest.approx([5e-3, 1e-2, 1e-2 * (1 - 1 / 8)])
    # ReNCE at theta = theta_old: ln(1 + |N|) per positive; groups with |N| = 2 and |N| = 3, mean over groups
    assert losses[0] == pytest.approx((math.log(3) + math.log(4)) / 2, rel=1e-5)
    assert losses[2] < losses[1] < losses[0]


def test_overlap_settings_default_on_with_cuda_only():
    p = Config().parallel
    assert optim.overlap_settings(p, use_cuda=False) == (False, False)
    assert optim.overlap_settings(p, use_cuda=True) == (True, False)  # param gather needs the distributed optimizer
    assert optim.overlap_settings(dataclasses.replace(p, distributed_optimizer=True), True) == (True, True)
    assert optim.overlap_settings(dataclasses.replace(p, overlap_grad_reduce=False), True) == (False, False)
    with pytest.raises(ConfigError, match="parallel.overlap_grad_reduce"):
        optim.overlap_settings(dataclasses.replace(p, overlap_grad_reduce=True), use_cuda=False)
    with pytest.raises(ConfigError, match="parallel.overlap_param_gather"):
        optim.overlap_settings(dataclasses.replace(p, overlap_param_gather=True), use_cuda=True)


def test_plan_microbatches_gives_every_rank_the_same_count():
    assert plan_microbatches(5, 2, 1, 0) == [[0, 1], [2, 3], [4]]
    assert plan_microbatches(5, 2, 2, 0) == [[0, 1], []]  # 2 groups vs 3 on the other rank: one filler
    assert plan_microbatches(5, 2, 2, 1) == [[2, 3], [4]]
    assert plan_microbatches(1, 2, 2, 0) == [[]]
    assert plan_microbatches(1, 2, 2, 1) == [[0]]


def test_batch_width_pads_for_splits_and_fp8():
    cfg = make_cfg(K)
    cfg.model = dataclasses.replace(MODEL, max_position_embeddings=4096)
    assert batch_width(cfg, 37, [8, 8, 3]) == 37
    cfg.parallel.tp, cfg.parallel.sequence_parallel = 4, True
    assert batch_width(cfg, 37, [8]) == 40  # 4 SP shards of 10
    cfg.model.fp8 = "delayed"  # bf16 is not needed here: only the padding rule is checked
    # rows 8 and 8: 8 * S / 4 a multiple of 16 -> S multiple of 8 (and of 4)
    assert batch_width(cfg, 37, [8, 8]) == 40
    # a 3-row microbatch (gcd 1): S / 4 itself a multiple of 16
    assert batch_width(cfg, 37, [8, 8, 3]) == 64
    cfg.model.fp8 = "blockwise"
    assert batch_width(cfg, 37, [8]) == 64  # 8 * 64 / 4 = 128
    assert batch_width(cfg, 37, [1]) == 512
    with pytest.raises(ValueError, match="max_position_embeddings=4096"):
        batch_width(cfg, 5000, [8])


def test_fp16_attaches_the_optimizers_loss_scale():
    scaled = SimpleNamespace(scale_loss=lambda loss: loss * 2.0**16)
    config = SimpleNamespace(fp16=True, grad_scale_func=None)
    optim.attach_loss_scale(config, scaled)
    assert config.grad_scale_func is scaled.scale_loss
    config = SimpleNamespace(fp16=False, grad_scale_func=None)  # bf16 / fp32: no scaler
    optim.attach_loss_scale(config, scaled)
    assert config.grad_scale_func is None


def test_input_errors_name_the_key(pstate):
    seqs, rewards, _ = batch(2)
    t = trainer(make_cfg(K + 2), pstate)
    objective = get_objective(t.cfg.objective)
    old = [torch.zeros(len(s) - p) for s, p in seqs]
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        t.train_step(seqs, objective, rewards, old, group_size=K, normalizer=1.0)
    t = trainer(make_cfg(K), pstate)
    with pytest.raises(ValueError, match=r"old_logprobs\[0\]"):
        t.train_step(seqs, objective, rewards, [torch.zeros(1)] + old[1:], group_size=K, normalizer=1.0)
    with pytest.raises(ValueError, match="whole groups"):
        t.train_step(seqs[:-1], objective, rewards[:-1], old[:-1], group_size=K, normalizer=1.0)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        t.train_step(seqs, get_objective(ObjectiveConfig(name="online_dpo")), rewards, old, group_size=K,
                     normalizer=1.0)


def _lrs(optim_cfg: OptimConfig, decay_steps: int, n: int) -> list[float]:
    groups = [{"lr": None}, {"lr": None, "wd_mult": 0.0}]
    scheduler = optim.build_scheduler(optim_cfg, SimpleNamespace(param_groups=groups), decay_steps)
    out = []
    for _ in range(n):
        assert groups[0]["lr"] == groups[1]["lr"]
        out.append(groups[0]["lr"])  # the lr optimizer step 1, 2, ... runs at
        scheduler.step(1)
    return out


def test_lr_schedule_hand_computed():
    cos = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_style="cosine")
    want = [0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.9 * 0.5 * (1 + math.cos(3 * math.pi / 4)),
            0.1, 0.1]
    assert _lrs(cos, 6, 7) == pytest.approx(want)
    assert [optim.lr_at(cos, s, 6) for s in range(1, 8)] == pytest.approx(want)
    linear = OptimConfig(lr=2.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_style="linear")
    assert _lrs(linear, 4, 5) == pytest.approx([1.5, 1.0, 0.5, 0.0, 0.0])
    constant = OptimConfig(lr=3.0, lr_warmup_steps=3, lr_decay_style="constant")
    assert _lrs(constant, 4, 5) == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0])
    with pytest.raises(ConfigError, match="optim.lr_decay_steps"):
        _lrs(OptimConfig(lr_warmup_steps=5), 5, 1)
    with pytest.raises(ConfigError, match="optim.min_lr"):
        _lrs(OptimConfig(lr=1.0, min_lr=2.0), 5, 1)
