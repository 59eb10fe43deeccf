"""Training throughput of one ReNCE optimizer step through the megatron Trainer: tokens/s and (GPU) MFU.

    python benchmarks/bench_train_step.py [--size 1b|3b|7b|tiny|small] [--seqs 32] [--prompt-len 256]
                                          [--response-len 768] [--steps 3] [--micro-batch 8]

A random-weight Llama-architecture model at TP=1 (world of one) trains on random token sequences split
into groups of K=8 with random rewards: log-probs of the old policy (one forward), then a train step
(forward + backward of every microbatch, optimizer). Reported: tokens/s of the train step (all tokens of
the packed sequences, prompt included, as they all go through the model) and, on CUDA, model FLOPs
utilisation against 989 TFLOP/s (H100/H200 dense BF16): 6 * N_params_non_embedding + attention
(6 * layers * seq * hidden per token, causal) + the output layer, per token, x3 for fwd+bwd already in the 6.
CPU runs fp32 with the local spec; GPU bf16 with the Transformer Engine spec when TE is installed.
"""
from __future__ import annotations

import argparse
import time

import torch

SIZES = {  # layers, hidden, ffn, heads, kv groups, vocab
    "tiny": (2, 256, 1024, 4, 2, 32000),
    "small": (8, 768, 3072, 12, 4, 32000),
    "1b": (16, 2048, 8192, 32, 8, 128256),  # Llama-3.2-1B shape (untied embeddings here)
    "3b": (28, 3072, 8192, 24, 8, 128256),  # Llama-3.2-3B shape (untied: 3.6B)
    "7b": (32, 4096, 14336, 32, 8, 128256),  # Llama-3.1-8B shape: 8.0B, ~135 GiB of training state at TP=1
}
STATE_BYTES_PER_PARAM = 18  # bf16 weight + fp32 grad buffer + fp32 main copy + two fp32 Adam moments
PEAK_TFLOPS = 989.0
K = 8


def flops_per_token(layers: int, hidden: int, ffn: int, heads: int, groups: int, vocab: int, seq: int) -> float:
    head_dim = hidden // heads
    attn_proj = hidden * (hidden + 2 * groups * head_dim) + hidden * hidden
    mlp = 3 * hidden * ffn
    dense = layers * (attn_proj + mlp) + hidden * vocab
    attention = layers * 2 * seq * hidden  # QK^T and AV, causal: half of 2 * 2 * seq * hidden
    return 6 * dense + 3 * attention


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--seqs", type=int, default=32, help="sequences per step (multiple of K=8)")
    parser.add_argument("--prompt-len", type=int, default=256 if torch.cuda.is_available() else 64)
    parser.add_argument("--response-len", type=int, default=768 if torch.cuda.is_available() else 192)
    parser.add_argument("--micro-batch", type=int, default=K, help="a multiple of K (whole groups)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after one warm-up step)")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    args = parser.parse_args(argv)

    from megatron_rence.config import Config, ModelConfig, ObjectiveConfig
    from megatron_rence.megatron import parallel
    from megatron_rence.megatron.model import available_transformer_impl, build_model
    from megatron_rence.megatron.step import Trainer
    from megatron_rence.objectives import get_objective

    layers, hidden, ffn, heads, groups, vocab = SIZES[args.size]
    cuda = torch.cuda.is_available()
    if cuda:  # weights, gradients and Adam state alone must fit one device at TP=1
        head_dim = hidden // heads
        params = layers * (hidden * (hidden + 2 * groups * head_dim) + hidden * hidden + 3 * hidden * ffn) \
            + 2 * vocab * hidden
        need, have = params * STATE_BYTES_PER_PARAM / 2**30, torch.cuda.get_device_properties(0).total_memory / 2**30
        if need > 0.9 * have:
            raise SystemExit(f"--size {args.size}: {params / 1e9:.1f}B parameters need ~{need:.0f} GiB of weights, "
                             f"gradients and Adam state at TP=1, more than this GPU's {have:.0f} GiB allows; "
                             f"pick a smaller --size (TP > 1 is not in this benchmark)")
    cfg = Config()
    cfg.model = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                            num_query_groups=groups, max_position_embeddings=args.prompt_len + args.response_len,
                            dtype="bf16" if cuda else "fp32", transformer_impl=available_transformer_impl(cuda))
    cfg.parallel.recompute = args.recompute
    cfg.objective = ObjectiveConfig(name="rence")
    cfg.rollout.num_samples = K
    cfg.train.micro_batch_size = args.micro_batch
    cfg.train.global_batch_size = args.seqs
    state = parallel.initialize(cfg.parallel, seed=0)
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab), state, vocab)
    n_params = sum(p.numel() for c in trainer.model_chunks for p in c.parameters())
    objective = get_objective(cfg.objective)
    g = torch.Generator().manual_seed(0)
    seq_len = args.prompt_len + args.response_len
    seqs = [(torch.randint(1, vocab, (seq_len,), generator=g).tolist(), args.prompt_len) for _ in range(args.seqs)]
    rewards = (torch.rand(args.seqs, generator=g) > 0.5).float()
    lengths = [args.response_len] * args.seqs
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), lengths)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        old = trainer.logprobs(seqs)
        t0 = time.perf_counter()
        trainer.train_step(seqs, objective, rewards, old, None, group_size=K, normalizer=normalizer)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step()  # warm-up
    times = [step() for _ in range(args.steps)]
    seconds = sorted(times)[len(times) // 2]
    tokens = args.seqs * seq_len
    tps = tokens / seconds
    flops = flops_per_token(layers, hidden, ffn, heads, groups, vocab, seq_len) * tokens / seconds
    device = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={device} size={args.size} params={n_params / 1e6:.1f}M dtype={cfg.model.dtype} "
          f"layers={cfg.model.transformer_impl} "
          f"seqs={args.seqs} x {seq_len} tokens micro_batch={args.micro_batch} recompute={args.recompute}")
    print(f"train step: median {seconds:.3f} s over {args.steps} steps | {tps:,.0f} tokens/s | "
          f"{flops / 1e12:.2f} TFLOP/s model FLOPs" + (f" | MFU {100 * flops / 1e12 / PEAK_TFLOPS:.1f}% of "
                                                         f"{PEAK_TFLOPS:.0f} TFLOP/s" if cuda else ""))
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    parallel.destroy()


if __name__ == "__main__":
    main()
