"""Peak memory and time of chunked vocab-parallel log-probs vs a naive full-vocabulary log_softmax.

    python benchmarks/bench_logprobs.py [--tokens 2048 4096] [--vocab 32000 151936] [--device cpu|cuda]

Both methods compute log softmax(logits / T)[target] for logits [tokens, vocab] and, in "fwd+bwd" mode,
the gradient w.r.t. the logits. Memory is the peak above what the inputs already hold: on CPU the peak
RSS (ru_maxrss) of a fresh worker process per measurement, on CUDA torch.cuda.max_memory_allocated.
TP=1 here; with TP the vocabulary per rank (and every figure) shrinks by the TP size.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from megatron_rence.megatron.logprobs import vocab_parallel_logprobs

TEMPERATURE = 0.9


def naive(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float() / TEMPERATURE, dim=-1).gather(1, targets[:, None]).squeeze(1)


def chunked(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_logprobs(logits, targets, None, TEMPERATURE)


METHODS = {"naive": naive, "chunked": chunked}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(method: str, mode: str, tokens: int, vocab: int, device: str) -> dict:
    """One measurement in this process: {"seconds", "peak_extra_mb"} (peak memory above the inputs)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logits = torch.randn(tokens, vocab, device=device, dtype=dtype, requires_grad=mode == "fwd+bwd")
    targets = torch.randint(0, vocab, (tokens,), device=device)
    fn = METHODS[method]
    if device == "cuda":
        fn(logits[:8].detach(), targets[:8])  # warm up kernels outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    start = time.perf_counter()
    if mode == "fwd+bwd":
        fn(logits, targets).sum().backward()
    else:
        with torch.no_grad():
            fn(logits, targets)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss_mb() - base
    return {"seconds": time.perf_counter() - start, "peak_extra_mb": peak}


def _run_isolated(method: str, mode: str, tokens: int, vocab: int, device: str) -> dict:
    if device == "cuda":
        return measure(method, mode, tokens, vocab, device)
    out = subprocess.run([sys.executable, __file__, "--worker", method, mode, str(tokens), str(vocab)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "MODE", "TOKENS", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.worker:
        method, mode, tokens, vocab = args.worker
        print(json.dumps(measure(method, mode, int(tokens), int(vocab), "cpu")))
        return
    dtype = "bf16" if args.device == "cuda" else "fp32"
    print(f"device={args.device} logits dtype={dtype} temperature={TEMPERATURE}")
    header = f"{'tokens':>7} {'vocab':>7} {'mode':>8} {'logits MB':>9} | {'naive s':>8} {'naive MB':>9} | " \
             f"{'chunked s':>9} {'chunked MB':>10} | {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        for tokens in args.tokens:
            logits_mb = tokens * vocab * (2 if dtype == "bf16" else 4) / 2**20
            for mode in ("fwd", "fwd+bwd"):
                n = _run_isolated("naive", mode, tokens, vocab, args.device)
                c = _run_isolated("chunked", mode, tokens, vocab, args.device)
                ratio = n["peak_extra_mb"] / max(c["peak_extra_mb"], 1e-9)
                print(f"{tokens:>7} {vocab:>7} {mode:>8} {logits_mb:>9.0f} | {n['seconds']:>8.2f} "
                      f"{n['peak_extra_mb']:>9.0f} | {c['seconds']:>9.2f} {c['peak_extra_mb']:>10.0f} | {ratio:>8.1f}x",
                      flush=True)


if __name__ == "__main__":
    main()
