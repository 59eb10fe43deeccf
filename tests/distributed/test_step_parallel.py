"""One train step at DP=4, TP=2+SP (DP=2), PP=2+VPP=2 (DP=2) and TP=2 x PP=2 gives the loss, gradient norm and
updated weights of a plain single-model AdamW step on the whole batch, from the same weights (4 gloo ranks).

The reference is rank-local plain torch (one GPTModel, whole-batch objective, backward, global-norm clip,
torch.optim.AdamW). Weights reach each layout through a TP=1 checkpoint (checkpoint.save / load reshard them).
Updated weights are compared through the per-sequence log-probs they give (every parameter moves them).
"""
import multiprocessing
import time

import launcher
import torch
import torch.distributed as dist

from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig, ParallelConfig
from megatron_rence.megatron import logprobs, packing, parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.step import Trainer, _GatherContextParallel, scatter_response
from megatron_rence.objectives import ObjectiveBatch, get_objective

VOCAB = 57
K = 2
TEMPERATURE = 0.9
LAYOUTS = [dict(), dict(tp=2, sequence_parallel=True), dict(pp=2, vpp=2), dict(tp=2, pp=2)]


def make_cfg(layout: dict) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=32, make_vocab_size_divisible_by=8,
                            tie_word_embeddings=True, dtype="fp32")
    cfg.parallel = ParallelConfig(**layout)
    cfg.objective = ObjectiveConfig(name="rence", kl_coef=0.1, beta=0.5)
    cfg.optim = OptimConfig(lr=3e-3, clip_grad=0.5, weight_decay=0.0)
    cfg.train.micro_batch_size = 2 * K  # 6 groups over dp ranks: uneven shares, filler rows and microbatches
    cfg.rollout.num_samples, cfg.rollout.temperature = K, TEMPERATURE
    return cfg


def make_batch():
    g = torch.Generator().manual_seed(3)
    seqs = []
    for _ in range(6 * K):
        prompt_len, response_len = int(torch.randint(2, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        seqs.append((torch.randint(1, VOCAB, (prompt_len + response_len,), generator=g).tolist(), prompt_len))
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    return seqs, rewards, g


def plain_logprobs(model, seqs) -> list[torch.Tensor]:
    whole = packing.pad_batch(seqs, 0)
    with torch.no_grad():
        token_lp = logprobs.logprobs_from_logits(model(whole.tokens, whole.position_ids, None), whole, None,
                                                 TEMPERATURE, VOCAB)
    return whole.response_logprobs(token_lp)


def reference(cfg: Config, model, seqs, rewards, old, ref, objective, normalizer) -> dict:
    """Whole-batch loss, gradient norm and log-probs after a clipped AdamW step, in plain torch."""
    whole = packing.pad_batch(seqs, 0)
    token_lp = logprobs.logprobs_from_logits(model(whole.tokens, whole.position_ids, None), whole, None,
                                             TEMPERATURE, VOCAB)
    width, prompt_lens = whole.tokens.shape[1], [p for _, p in seqs]
    mb = ObjectiveBatch(token_lp, scatter_response(old, prompt_lens, width), whole.loss_mask, rewards, K,
                        scatter_response(ref, prompt_lens, width))
    loss, _ = objective(mb, normalizer)
    loss.backward()
    params = list(model.parameters())
    norm = torch.sqrt(sum(p.grad.double().square().sum() for p in params)).item()
    for p in params:
        p.grad.mul_(min(1.0, cfg.optim.clip_grad / (norm + 1e-6)))
    o = cfg.optim
    torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, weight_decay=0.0).step()
    return {"loss": loss.item(), "grad_norm": norm, "after": plain_logprobs(model, seqs)}


def _gather_cp(rank: int, group) -> dict:
    """_GatherContextParallel over a 2-rank group: chunks (r, 2cp-1-r) reassemble; backward keeps own columns."""
    width = 8
    full = torch.arange(2 * width, dtype=torch.float32).reshape(2, width)
    idx = packing.cp_chunk_indices(width, rank, 2)
    local = full[:, idx].clone().requires_grad_()
    out = _GatherContextParallel.apply(local, group, rank, 2)
    (out * torch.arange(width, dtype=torch.float32)).sum().backward()
    return {"equal": torch.equal(out, full), "grad": local.grad[0].tolist(), "want": idx.float().tolist()}


def allow_child_processes() -> None:
    """The launcher's ranks are daemonic; megatron's torch_dist checkpoint writer forks worker processes, which
    multiprocessing refuses to daemons. The launcher still terminates every rank (and so its writers) at the end."""
    multiprocessing.current_process()._config["daemon"] = False


def _world4(ckpt_dir: str) -> dict:
    torch.set_num_threads(1)
    allow_child_processes()
    seqs, rewards, g = make_batch()
    base_cfg = make_cfg({})
    st = parallel.initialize(base_cfg.parallel, seed=21)
    base = Trainer(base_cfg, build_model(base_cfg.model, base_cfg.parallel, VOCAB), st, VOCAB)
    base.save(ckpt_dir, 0, {})  # the shared starting weights (no optimizer state yet)
    before = plain_logprobs(base.model_chunks[0], seqs)
    old = [v + 0.2 * torch.randn(v.shape, generator=g) for v in before]
    ref = [v + 0.1 * torch.randn(v.shape, generator=g) for v in before]
    objective = get_objective(base_cfg.objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [len(v) for v in old])
    plain = build_model(base_cfg.model, base_cfg.parallel, VOCAB)[0]  # unwrapped copy: .grad, not DDP's main_grad
    with torch.no_grad():
        for p, q in zip(plain.parameters(), base.model_chunks[0].parameters(), strict=True):
            p.copy_(q)
    want = reference(base_cfg, plain, seqs, rewards, old, ref, objective, normalizer)
    out = {"want": {k: v for k, v in want.items() if k != "after"}, "seconds": {}}
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        cfg = make_cfg(layout)
        st = parallel.initialize(cfg.parallel, seed=99)  # another init: the loaded weights must be what counts
        trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, VOCAB), st, VOCAB)
        trainer.load(ckpt_dir)
        start_err = max((a - b).abs().max().item() for a, b in zip(trainer.logprobs(seqs, TEMPERATURE), before))
        m = trainer.train_step(seqs, objective, rewards, old, ref, group_size=K, normalizer=normalizer)
        after = trainer.logprobs(seqs, TEMPERATURE)
        out[str(layout)] = {"start_err": start_err, "loss": m["loss/total"], "grad_norm": m["train/grad_norm"],
                            "after_err": max((a - b).abs().max().item() for a, b in zip(after, want["after"])),
                            "moved": max((a - b).abs().max().item() for a, b in zip(after, before)),
                            "num_sequences": m["train/num_sequences"]}
        out["seconds"][str(layout)] = time.perf_counter() - t0
    pair = dist.new_group([0, 1])  # every rank takes part in creating the group
    out["gather_cp"] = _gather_cp(st.rank, pair) if st.rank < 2 else None
    parallel.destroy()
    return out


def test_train_step_matches_plain_whole_batch_step_across_layouts(tmp_path):
    per_rank = launcher.run(_world4, 4, str(tmp_path / "ckpt"), timeout=400)
    want = per_rank[0]["want"]
    for rank, out in enumerate(per_rank):
        assert out["want"] == want  # every rank computed the same reference
        for layout in map(str, LAYOUTS):
            r = out[layout]
            assert r["start_err"] < 1e-5, (layout, rank, r)  # the checkpoint resharded the starting weights
            assert r["num_sequences"] == 12, (layout, r)  # every sequence trained once (summed over DP ranks)
            assert abs(r["loss"] - want["loss"]) < 1e-5 * max(1.0, abs(want["loss"])), (layout, rank, r, want)
            assert abs(r["grad_norm"] - want["grad_norm"]) < 1e-5 * want["grad_norm"], (layout, rank, r, want)
            assert want["grad_norm"] > 0.5  # clipping is active: the clip must use the same global norm
            assert r["moved"] > 1e-3 and r["after_err"] < 2e-5 * max(1.0, r["moved"]) * 10, (layout, rank, r)
    for rank in (0, 1):
        g = per_rank[rank]["gather_cp"]
        assert g["equal"] and g["grad"] == g["want"], g
