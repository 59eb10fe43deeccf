"""The trainer's memory hand-off around rollout (megatron/offload.py) on one device: GiB freed, seconds each way,
and whether a training step after an offload / restore round trip equals one without it.

    python benchmarks/bench_offload.py [--size 1b|tiny] [--seqs 8] [--seq-len 256] [--mem-fraction 0.5]

A bf16 Trainer (megatron's Float16 optimizer, fp32 main params) takes one step (so Adam state exists) and a
snapshot of its state is kept on the host; it takes a second step (the reference result), is put back to the
snapshot, offloads gradients + optimizer state, then its parameters (train.offload_params), restores
everything and takes the second step again. Printed: allocated / reserved GPU memory and
free device memory at each point, the GiB each call freed, its seconds, and the SGLang static pool an engine
started at that point would get (mem_fraction_static x free memory at its start: sglang model_runner).
Checked: every parameter, main parameter and Adam moment is bitwise equal after the round trip, and the second
step gives bitwise equal weights with and without it (exit status 1 otherwise). On CPU (tiny model) the same
calls run; nothing but the gradient buffers leaves (there is no other memory to move to).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

SIZES = {  # layers, hidden, ffn, heads, kv groups, vocab
    "tiny": (2, 128, 512, 4, 2, 1000),
    "1b": (16, 2048, 8192, 32, 8, 32000),  # Llama-3.2-1B layers with a 32K vocabulary: 1.1B parameters
}
GiB = 2 ** 30
K = 4


def device_line(label: str) -> str:
    if not torch.cuda.is_available():
        return f"  {label:<34} (no CUDA: GPU memory 0)"
    free, total = torch.cuda.mem_get_info()
    return (f"  {label:<34} allocated {torch.cuda.memory_allocated() / GiB:7.2f} GiB  reserved "
            f"{torch.cuda.memory_reserved() / GiB:7.2f} GiB  free {free / GiB:7.2f} of {total / GiB:.1f} GiB")


def pool_line(fraction: float) -> str:
    if not torch.cuda.is_available():
        return "  -> (no CUDA: no SGLang pool to size)"
    free, _ = torch.cuda.mem_get_info()
    return (f"  -> an SGLang engine started now: static pool {fraction} x {free / GiB:.2f} = "
            f"{fraction * free / GiB:.2f} GiB")


def _live_state(trainer) -> list[torch.Tensor]:
    """Parameters, the optimizer's (main) parameters and Adam moments (step counts included), in a fixed order."""
    out = [p for c in trainer.model_chunks for p in c.parameters()]
    out += [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for part in trainer.optimizer.chained_optimizers:
        for state in part.optimizer.state.values():
            out += [v for _, v in sorted(state.items()) if isinstance(v, torch.Tensor)]
    return out


def snapshot(trainer) -> list[torch.Tensor]:
    return [t.detach().cpu().clone() for t in _live_state(trainer)]


@torch.no_grad()
def load_snapshot(trainer, tensors: list[torch.Tensor]) -> None:
    live = _live_state(trainer)
    assert len(live) == len(tensors)
    for t, saved in zip(live, tensors):
        t.copy_(saved)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="1b" if cuda else "tiny")
    parser.add_argument("--seqs", type=int, default=8, help="sequences per step (multiple of K=4)")
    parser.add_argument("--seq-len", type=int, default=256 if cuda else 32)
    parser.add_argument("--mem-fraction", type=float, default=0.5, help="rollout.sglang.mem_fraction_static")
    args = parser.parse_args(argv)

    from megatron_rence.config import Config, ModelConfig, ObjectiveConfig, OptimConfig
    from megatron_rence.megatron import parallel
    from megatron_rence.megatron.model import available_transformer_impl, build_model
    from megatron_rence.megatron.offload import MemoryHandoff
    from megatron_rence.megatron.step import Trainer
    from megatron_rence.objectives import get_objective

    layers, hidden, ffn, heads, groups, vocab = SIZES[args.size]
    cfg = Config()
    cfg.model = ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                            num_query_groups=groups, max_position_embeddings=args.seq_len, dtype="bf16",
                            transformer_impl=available_transformer_impl(cuda))
    cfg.objective = ObjectiveConfig(name="rence")
    cfg.optim = OptimConfig(lr=1e-4, clip_grad=1.0)
    cfg.rollout.num_samples = K
    cfg.train.micro_batch_size = K
    cfg.train.global_batch_size = args.seqs
    state = parallel.initialize(cfg.parallel, seed=0)
    print(f"device={torch.cuda.get_device_name() if cuda else 'cpu'} size={args.size} "
          f"layers={cfg.model.transformer_impl}")
    print(device_line("start") + "\n" + pool_line(args.mem_fraction))
    trainer = Trainer(cfg, build_model(cfg.model, cfg.parallel, vocab), state, vocab)
    n_params = sum(p.numel() for c in trainer.model_chunks for p in c.parameters())
    print(f"trainer of {n_params / 1e9:.3f}B params, {trainer.precision()}")
    objective = get_objective(cfg.objective)
    g = torch.Generator().manual_seed(0)
    prompt = args.seq_len // 4
    seqs = [(torch.randint(1, vocab, (args.seq_len,), generator=g).tolist(), prompt) for _ in range(args.seqs)]
    rewards = (torch.arange(args.seqs) % 2).float()
    normalizer = objective.normalizer_for(rewards.reshape(-1, K), [args.seq_len - prompt] * args.seqs)
    old = trainer.logprobs(seqs)

    def step(t):
        return t.train_step(seqs, objective, rewards, old, None, group_size=K, normalizer=normalizer)

    step(trainer)  # Adam state exists from here on
    saved = snapshot(trainer)
    step(trainer)
    want = [p.detach().cpu().clone() for c in trainer.model_chunks for p in c.parameters()]
    load_snapshot(trainer, saved)
    print(device_line("trained"))
    handoff = MemoryHandoff(trainer, None, offload_params=True)
    offloaded, t_off = timed(handoff.offload)
    print(device_line("offload grads + optimizer") + f"  in {t_off:.3f} s: grad buffers freed "
          f"{offloaded['memory/grad_buffers_freed_gib']:.3f} GiB, optimizer moved "
          f"{offloaded['memory/optimizer_offloaded_gib']:.3f} GiB")
    print(pool_line(args.mem_fraction))
    params, t_par = timed(handoff.offload_params)
    print(device_line("offload params too") + f"  in {t_par:.3f} s: moved "
          f"{params['memory/params_offloaded_gib']:.3f} GiB")
    print(pool_line(args.mem_fraction))
    _, t_res = timed(handoff.restore)
    print(device_line("restore everything") + f"  in {t_res:.3f} s")
    same_state = all(torch.equal(a, b) for a, b in zip(saved, snapshot(trainer)))
    step(trainer)
    got = [p.detach().cpu() for c in trainer.model_chunks for p in c.parameters()]
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got))
    print(f"round trip: state bitwise equal {same_state}; the next step with vs without the round trip: "
          f"max |weight diff| {diff:.3g} ({'equal' if diff == 0 else 'DIFFERENT'})")
    print(f"seconds: offload {t_off:.3f}, offload params {t_par:.3f}, restore {t_res:.3f}")
    parallel.destroy()
    return 0 if same_state and diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
