"""Useful-token fraction of padded vs packed (THD, token-budget) microbatches on a long-tailed RL length mix, and
CPU tokens/s of one padded vs one packed train step on the same batch, measured in one run.

    python benchmarks/bench_packing.py [--recipe recipes/rence_70b.yaml] [--gpus 64] [--json]

Mix: 512 sequences (64 prompts x K=8 of the recipe), response lengths lognormal (median 1,800, sigma 0.75,
capped at rollout.max_new_tokens = 7,680), prompts lognormal (median 300, sigma 0.3, capped at
data.max_prompt_len). Fractions use the trainer's own planning (step.plan_microbatches / batch_width for the
padded path, packing.plan_token_budget / pad_multiple for the packed path) with the recipe's micro_batch_size,
max_tokens_per_microbatch, TP / CP / SP / FP8 padding multiples and data-parallel size (--gpus / (tp*pp*cp)):
useful = real tokens / tokens computed; attn = the same for causal attention cost (sum of L^2 over sequences vs
what each layout computes: rows x width^2 padded, sum of padded L^2 packed).

CPU timing (a tiny model, lengths scaled down 16x: median 112, cap 480, prompts ~19; 64 sequences, K=8): one
Trainer, alternating padded (train.packing=false, micro_batch_size=8) and packed (token budget 8 x 512) steps,
median of --repeats each; tokens/s counts real tokens. Absolute CPU figures depend on contention.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from megatron_rence.config import Config
from megatron_rence.megatron import packing
from megatron_rence.megatron.step import batch_width, plan_microbatches


def length_mix(num: int, median: float, cap: int, prompt_median: float, prompt_cap: int, seed: int = 0):
    """[(prompt_len, response_len)] with lognormal responses (sigma 0.75) and prompts (sigma 0.3)."""
    g = torch.Generator().manual_seed(seed)
    resp = torch.exp(math.log(median) + 0.75 * torch.randn(num, generator=g)).round().clamp(1, cap).long()
    prompt = torch.exp(math.log(prompt_median) + 0.3 * torch.randn(num, generator=g)).round().clamp(1, prompt_cap)
    return list(zip(prompt.long().tolist(), resp.tolist()))


def useful_fractions(cfg: Config, lengths: list[int], k: int, dp: int) -> dict:
    """Real / computed tokens (and causal attention cost) of the padded and the packed plan, all DP ranks."""
    p, t = cfg.parallel, cfg.train
    num_groups, mbs = len(lengths) // k, t.micro_batch_size
    real, real_attn = sum(lengths), sum(n * n for n in lengths)
    # padded: every microbatch of a rank [rows, width], width = the step's longest, padded to the multiple
    padded = padded_attn = 0
    plans = [plan_microbatches(num_groups, mbs // k, dp, r) for r in range(dp)]
    rows = min(mbs, max(len(mb) * k for plan in plans for mb in plan))
    for plan in plans:
        counts = [rows if p.pp > 1 else max(1, len(mb) * k) for mb in plan]
        width = batch_width(cfg, max(lengths), counts)
        padded += sum(c * width for c in counts)
        padded_attn += sum(c * width * width for c in counts)
    # packed: groups by token budget, sequences padded to the TP/CP multiple, each row to the FP8 multiple
    multiple = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel)
    total = packing.pad_multiple(p.tp, p.cp, p.sequence_parallel, packing.fp8_align_for(cfg.model.fp8))
    up = lambda n, m: -(-n // m) * m  # noqa: E731
    costs = [sum(up(lengths[g * k + j], multiple) for j in range(k)) for g in range(num_groups)]
    if t.max_tokens_per_microbatch:
        packed_plans = packing.plan_token_budget(costs, t.max_tokens_per_microbatch, dp)
    else:
        packed_plans = plans
    packed = packed_attn = num_packed_mb = 0
    for plan in packed_plans:
        for groups in plan:
            seqs = [up(lengths[g * k + j], multiple) for g in groups for j in range(k)] or [multiple]
            packed += up(sum(seqs), total)
            packed_attn += sum(n * n for n in seqs)
            num_packed_mb += 1
    return {"real_tokens": real, "padded_tokens": padded, "packed_tokens": packed,
            "padded_useful_frac": real / padded, "packed_useful_frac": real / packed,
            "padded_attn_useful_frac": real_attn / padded_attn, "packed_attn_useful_frac": real_attn / packed_attn,
            "padded_microbatches": sum(len(plan) for plan in plans), "packed_microbatches": num_packed_mb}


def cpu_tokens_per_second(repeats: int) -> dict:
    """One tiny-model Trainer on one process: median seconds of padded vs packed train steps on one batch."""
    from megatron_rence.config import ModelConfig, ObjectiveConfig
    from megatron_rence.megatron import parallel
    from megatron_rence.megatron.model import build_model
    from megatron_rence.megatron.step import Trainer
    from megatron_rence.objectives import get_objective

    k, vocab, max_len = 8, 256, 512
    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                            num_query_groups=2, max_position_embeddings=max_len, dtype="fp32")
    cfg.objective = ObjectiveConfig(name="rence")
    cfg.rollout.num_samples = k
    cfg.train.micro_batch_size, cfg.train.global_batch_size = k, 64
    state = parallel.initialize(cfg.parallel, seed=0)
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab), state, vocab)
    g = torch.Generator().manual_seed(1)
    mix = length_mix(64, 1800 / 16, 7680 // 16, 300 / 16, 32, seed=1)
    seqs = [(torch.randint(1, vocab, (pl + rl,), generator=g).tolist(), pl) for pl, rl in mix]
    rewards = (torch.rand(len(seqs), generator=g) > 0.5).float()
    objective = get_objective(cfg.objective)
    normalizer = objective.normalizer_for(rewards.reshape(-1, k), [rl for _, rl in mix])
    old = trainer.logprobs(seqs)
    modes = {"padded": (False, 0), "packed": (True, k * max_len)}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats + 1):  # the first round warms up
        for mode, (packed, budget) in modes.items():
            cfg.train.packing, cfg.train.max_tokens_per_microbatch = packed, budget
            t0 = time.perf_counter()
            trainer.train_step(seqs, objective, rewards, old, None, group_size=k, normalizer=normalizer)
            seconds[mode].append(time.perf_counter() - t0)
    parallel.destroy()
    real = sum(len(t) for t, _ in seqs)
    median = {m: sorted(s[1:])[len(s[1:]) // 2] for m, s in seconds.items()}
    return {"cpu_real_tokens": real, "cpu_padded_tokens_per_s": real / median["padded"],
            "cpu_packed_tokens_per_s": real / median["packed"],
            "cpu_speedup": median["padded"] / median["packed"], "cpu_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/rence_70b.yaml")
    parser.add_argument("--gpus", type=int, default=64, help="GPUs of the run: DP = gpus / (tp*pp*cp)")
    parser.add_argument("--repeats", type=int, default=3, help="measured CPU steps per layout (0: no timing)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)

    from megatron_rence.recipe import load_recipe

    cfg = load_recipe(args.recipe)
    p, r = cfg.parallel, cfg.rollout
    dp = args.gpus // (p.tp * p.pp * p.cp)
    mix = length_mix(r.prompts_per_step * r.num_samples, 1800, r.max_new_tokens, 300, cfg.data.max_prompt_len)
    out = {"recipe": args.recipe, "dp": dp, "num_sequences": len(mix),
           "micro_batch_size": cfg.train.micro_batch_size,
           "max_tokens_per_microbatch": cfg.train.max_tokens_per_microbatch,
           **useful_fractions(cfg, [pl + rl for pl, rl in mix], r.num_samples, dp)}
    if args.repeats:
        out.update(cpu_tokens_per_second(args.repeats))
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
