"""Throughput of the per-step weight sync stream (`iter_hf_buckets`) against a plain copy of the same bytes.

    python benchmarks/bench_weight_sync.py [--layers 12 --hidden 1024 --ffn 2816 --heads 16 --groups 4
        --vocab 32000] [--dtype bf16] [--bucket-mb 64 512] [--tp 1 2] [--repeats 5] [--device cpu|cuda]

A Llama-shaped model (untied embeddings, random weights) is built at each TP size (TP=1 in this process,
TP>1 on spawned local ranks: gloo on CPU, NCCL on GPU) and streamed to rank 0 once to warm up (the plan is
built and cached), then `--repeats` times; the best pass counts. Columns:
  stream     GB/s of full HF tensors yielded on rank 0 (TP gather + fc1 re-chunk + QKV split + vocab strip);
  +consume   the same while rank 0 copies every bucket into one flat buffer, the least an engine does;
  copy_      the physical limit: one `torch.Tensor.copy_` of the same number of bytes on the same device
             (device-to-device on GPU, memcpy on CPU), best of `--repeats`.
GB are 1e9 bytes of the HF tensors (unpadded vocabulary) in the training dtype.
"""
from __future__ import annotations

import argparse
import os
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bound(num_bytes: int, device: torch.device, repeats: int) -> float:
    """GB/s of one `copy_` of `num_bytes` bytes within `device` (best of `repeats` after a warm-up)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def _one_pass(chunks, model_cfg, vocab: int, bucket_bytes: int, pstate, flat) -> tuple[float, int, int]:
    """(seconds, HF bytes, buckets) of one full stream to rank 0; `flat` (rank 0 only): copy buckets into it."""
    from megatron_rence.weights.sync import iter_hf_buckets

    num_bytes = num_buckets = 0
    _sync(pstate.device)
    torch.distributed.barrier()
    start = time.perf_counter()
    for bucket in iter_hf_buckets(chunks, model_cfg, vocab, bucket_bytes, pstate, dst_ranks=(0,)):
        offset = 0
        for _, tensor in bucket:
            n = tensor.numel() * tensor.element_size()
            if flat is not None:
                flat[offset:offset + n].copy_(tensor.contiguous().view(-1).view(torch.uint8))
            offset += n
        num_bytes += offset
        num_buckets += 1
    _sync(pstate.device)
    return time.perf_counter() - start, num_bytes, num_buckets


def measure(args, tp: int) -> list[dict]:
    """On every rank of a TP=`tp` layout: one row per bucket size (meaningful on rank 0)."""
    from megatron_rence.config import ModelConfig, ParallelConfig
    from megatron_rence.megatron import parallel
    from megatron_rence.megatron.model import build_model

    model_cfg = ModelConfig(arch="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                            num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                            tie_word_embeddings=False, dtype=args.dtype, max_position_embeddings=4096)
    layout = ParallelConfig(tp=tp)
    pstate = parallel.initialize(layout, seed=0)
    try:
        chunks = build_model(model_cfg, layout, args.vocab)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        for chunk in chunks:  # CPU models are built in fp32; sync in the training dtype
            chunk.to(dtype)
        num_params = sum(p.numel() for c in chunks for p in c.parameters())
        rows = []
        for bucket_mb in args.bucket_mb:
            bucket_bytes = int(bucket_mb * 2**20)
            flat = (torch.empty(bucket_bytes + max(p.numel() for c in chunks for p in c.parameters()) * tp
                                * dtype.itemsize, dtype=torch.uint8, device=pstate.device)
                    if pstate.rank == 0 else None)  # a tensor larger than a bucket travels alone
            _one_pass(chunks, model_cfg, args.vocab, bucket_bytes, pstate, flat)  # warm-up: plan, first touch
            stream = min(_one_pass(chunks, model_cfg, args.vocab, bucket_bytes, pstate, None)
                         for _ in range(args.repeats))
            consume = min(_one_pass(chunks, model_cfg, args.vocab, bucket_bytes, pstate, flat)
                          for _ in range(args.repeats))
            del flat
            rows.append(dict(tp=tp, bucket_mb=bucket_mb, params_per_rank=num_params, bytes=stream[1],
                             buckets=stream[2], stream_s=stream[0], consume_s=consume[0]))
        return rows
    finally:
        parallel.destroy()


def _spawned(rank: int, world_size: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world_size))
    rows = measure(args, world_size)
    if rank == 0:
        queue.put(rows)


def run_layout(args, tp: int) -> list[dict]:
    if tp == 1:
        return measure(args, 1)
    import torch.multiprocessing as mp

    from megatron_rence.megatron.parallel import free_port

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned, args=(tp, free_port(), args, queue), nprocs=tp, join=True)
    return queue.get()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--groups", type=int, default=4, help="query groups (KV heads)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="training dtype of the weights")
    parser.add_argument("--bucket-mb", type=float, nargs="+", default=[64.0, 512.0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads in all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    args = parser.parse_args(argv)
    if args.device == "cpu":  # before anything asks CUDA: megatron_rence.megatron uses CUDA whenever it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        skipped = [tp for tp in args.tp if tp > torch.cuda.device_count()]
        args.tp = [tp for tp in args.tp if tp not in skipped]
        if skipped:
            print(f"skipping --tp {skipped}: {torch.cuda.device_count()} GPU(s) visible")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"device={args.device} dtype={args.dtype} threads={args.threads} model: layers={args.layers} "
          f"hidden={args.hidden} ffn={args.ffn} heads={args.heads}/{args.groups} vocab={args.vocab} (untied)")
    if args.device == "cpu":  # other processes on the CPUs make every figure slower and noisier
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'tp':>3} {'bucket MB':>9} {'buckets':>7} {'GB':>6} | {'stream s':>8} {'GB/s':>6} | "
              f"{'+consume s':>10} {'GB/s':>6} | {'copy_ GB/s':>10} | {'vs copy_: stream':>16} {'+consume':>8}")
    rows = []
    for tp in args.tp:
        rows += run_layout(args, tp)
    bound = copy_bound(rows[0]["bytes"], device, args.repeats)
    print("parameters on rank 0: " + ", ".join(f"TP={r['tp']} {r['params_per_rank'] / 1e6:.1f} M"
                                               for r in rows if r["bucket_mb"] == args.bucket_mb[0]))
    print(header)
    print("-" * len(header))
    for r in rows:
        gb = r["bytes"] / 1e9
        stream, consume = gb / r["stream_s"], gb / r["consume_s"]
        print(f"{r['tp']:>3} {r['bucket_mb']:>9g} {r['buckets']:>7} {gb:>6.3f} | {r['stream_s']:>8.3f} "
              f"{stream:>6.2f} | {r['consume_s']:>10.3f} {consume:>6.2f} | {bound:>10.2f} | {stream / bound:>15.2f}x "
              f"{consume / bound:>7.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
