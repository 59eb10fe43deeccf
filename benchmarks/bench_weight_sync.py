"""Throughput and bytes per rank of the per-step weight sync, before (issue 14) and after, against `copy_`.

    python benchmarks/bench_weight_sync.py [--layers 12 --hidden 1024 --ffn 2816 --heads 16 --groups 4
        --vocab 32000] [--dtype bf16] [--bucket-mb 64 512] [--tp 1 2] [--feed rank0 all] [--repeats 5]
        [--device cpu|cuda] [--no-bytes]

A Llama-shaped model (untied embeddings, random weights) is built at each TP size (TP=1 in this process,
TP>1 on spawned local ranks: gloo on CPU, NCCL on GPU) and streamed once to warm up (the plan is built and
cached), then `--repeats` times; the best pass counts. Two transports:
  before   the transport replaced in issue 14, kept here only for this comparison: TP rank 0 of the owning
           stage (data replica 0) gathers each full tensor and `dist.send`s it to every feeding rank in turn;
  after    weights.sync: TP pieces relayed across stages, TP all-gather on every feeding rank.
`--feed rank0`: rank 0 feeds the engine (the CPU engine); `all`: every rank does (SGLang groups). Columns:
  stream     GB/s of full HF tensors yielded on rank 0 (gather + fc1 re-chunk + QKV split + vocab strip);
  +consume   the same while rank 0 copies every bucket into one flat buffer, the least an engine does;
  copy_      the physical limit: one `torch.Tensor.copy_` of the same number of bytes on the same device.
Then (unless --no-bytes) the busiest rank's bytes sent / received per sync on 4 ranks at TP2 x PP2 with every
rank feeding, counted in each transport's code path, next to the cost model's figure (planning/sync_cost.py),
and the 70B recipe's busiest rank before (analytic: the old algorithm on the same tensor shapes) and after.
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


def _old_stream(chunks, model_cfg, vocab: int, bucket_bytes: int, pstate, dst_ranks, count):
    """The transport before issue 14 (weights/sync.py at 847d9cc), with its bytes counted: TP rank 0 of the
    owning stage in data replica 0 all-gathers each tensor and sends it whole to every other feeding rank."""
    import torch.distributed as dist

    from megatron_rence.weights.mapping import dims_of, get_mapping
    from megatron_rence.weights.plan import make_buckets, merge_tp_shards, unwrap
    from megatron_rence.weights.sync import _plan

    mapping, dims = get_mapping(model_cfg.arch), dims_of(model_cfg, vocab)
    plans, _ = _plan(chunks, pstate, model_cfg.tie_word_embeddings)
    params = [dict(unwrap(c).named_parameters()) for c in chunks]
    for bucket in make_buckets(plans, bucket_bytes):
        out = []
        for plan in bucket:
            full = None
            if pstate.pp_rank == plan.pp_rank and pstate.dp_rank == 0 and pstate.cp_rank == 0:
                local = params[plan.chunk][plan.local_name].detach()
                if plan.tp_dim is not None and pstate.tp_size > 1:
                    shards = [torch.empty_like(local) for _ in range(pstate.tp_size)]
                    dist.all_gather(shards, local.contiguous(), group=pstate.tp_group)
                    nbytes = (pstate.tp_size - 1) * local.numel() * local.element_size()
                    count.sent_intra += nbytes
                    count.recv_intra += nbytes
                    full = merge_tp_shards(shards, plan) if pstate.rank == plan.src_rank else None
                elif pstate.rank == plan.src_rank:
                    full = local
            if pstate.rank == plan.src_rank:
                for dst in dst_ranks:
                    if dst != plan.src_rank:
                        dist.send(full.contiguous(), dst)
                        count.sent_intra += full.numel() * full.element_size()
                        count.messages += 1
            elif pstate.rank in dst_ranks:
                full = torch.empty(plan.full_shape, dtype=plan.dtype, device=pstate.device)
                dist.recv(full, plan.src_rank)
                count.recv_intra += full.numel() * full.element_size()
            if full is not None and pstate.rank in dst_ranks:
                out.extend(mapping.to_hf(plan.name, full, dims))
        if pstate.rank in dst_ranks:
            yield out


def _stream(transport: str, chunks, model_cfg, vocab: int, bucket_bytes: int, pstate, dst_ranks, count=None):
    from megatron_rence.weights.routes import ByteCount
    from megatron_rence.weights.sync import iter_hf_buckets

    count = count if count is not None else ByteCount()
    if transport == "before":
        return _old_stream(chunks, model_cfg, vocab, bucket_bytes, pstate, dst_ranks, count)
    return iter_hf_buckets(chunks, model_cfg, vocab, bucket_bytes, pstate, dst_ranks, count=count)


def _one_pass(transport: str, chunks, model_cfg, vocab: int, bucket_bytes: int, pstate, dst_ranks,
              flat) -> tuple[float, int, int]:
    """(seconds, HF bytes, buckets) of one full stream, measured on rank 0; `flat`: copy buckets into it."""
    num_bytes = num_buckets = 0
    _sync(pstate.device)
    torch.distributed.barrier()
    start = time.perf_counter()
    for bucket in _stream(transport, chunks, model_cfg, vocab, bucket_bytes, pstate, dst_ranks):
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


def _model_cfg(args):
    from megatron_rence.config import ModelConfig

    return ModelConfig(arch="llama", num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn,
                       num_attention_heads=args.heads, num_query_groups=args.groups, vocab_size=args.vocab,
                       tie_word_embeddings=False, dtype=args.dtype, max_position_embeddings=4096)


def _build(args, layout):
    from megatron_rence.megatron.model import build_model

    chunks = build_model(_model_cfg(args), layout, args.vocab)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    for chunk in chunks:  # CPU models are built in fp32; sync in the training dtype
        chunk.to(dtype)
    return chunks, dtype


def measure(args, tp: int) -> list[dict]:
    """On every rank of a TP=`tp` layout: one row per (feed, transport, bucket size) (meaningful on rank 0)."""
    from megatron_rence.config import ParallelConfig
    from megatron_rence.megatron import parallel

    layout = ParallelConfig(tp=tp)
    pstate = parallel.initialize(layout, seed=0)
    try:
        chunks, dtype = _build(args, layout)
        model_cfg = _model_cfg(args)
        num_params = sum(p.numel() for c in chunks for p in c.parameters())
        rows = []
        for feed in args.feed:
            dst_ranks = [0] if feed == "rank0" else list(range(pstate.world_size))
            for transport in ("before", "after"):
                for bucket_mb in args.bucket_mb:
                    bucket_bytes = int(bucket_mb * 2**20)
                    flat = (torch.empty(bucket_bytes + max(p.numel() for c in chunks for p in c.parameters()) * tp
                                        * dtype.itemsize, dtype=torch.uint8, device=pstate.device)
                            if pstate.rank in dst_ranks else None)  # a tensor larger than a bucket travels alone
                    run = (transport, chunks, model_cfg, args.vocab, bucket_bytes, pstate, dst_ranks)
                    _one_pass(*run, flat)  # warm-up: plan, first touch
                    stream = min(_one_pass(*run, None) for _ in range(args.repeats))
                    consume = min(_one_pass(*run, flat) for _ in range(args.repeats))
                    del flat
                    rows.append(dict(tp=tp, feed=feed, transport=transport, bucket_mb=bucket_mb,
                                     params_per_rank=num_params, bytes=stream[1], buckets=stream[2],
                                     stream_s=stream[0], consume_s=consume[0]))
        return rows
    finally:
        parallel.destroy()


def rank_bytes_4(args) -> dict:
    """On 4 ranks at TP2 x PP2, every rank feeding: each rank's (sent, received) per transport, gathered."""
    from megatron_rence.config import ParallelConfig
    from megatron_rence.megatron import parallel
    from megatron_rence.weights.routes import ByteCount

    layout = ParallelConfig(tp=2, pp=2)
    pstate = parallel.initialize(layout, seed=0)
    try:
        chunks, _ = _build(args, layout)
        out = {}
        for transport in ("before", "after"):
            count = ByteCount()
            for _ in _stream(transport, chunks, _model_cfg(args), args.vocab, 64 * 2**20, pstate,
                             list(range(pstate.world_size)), count):
                pass
            gathered = [None] * pstate.world_size
            torch.distributed.all_gather_object(gathered, (count.sent, count.received, count.messages))
            out[transport] = gathered
        return out
    finally:
        parallel.destroy()


def _spawned(rank: int, world_size: int, port: int, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world_size))
    result = fn(args, world_size) if fn is measure else fn(args)
    if rank == 0:
        queue.put(result)


def spawn(fn, world_size: int, args):
    if world_size == 1:
        return fn(args, 1)
    import torch.multiprocessing as mp

    from megatron_rence.megatron.parallel import free_port

    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned, args=(world_size, free_port(), fn, args, queue), nprocs=world_size, join=True)
    return queue.get()


def old_busiest_bytes(cfg, vocab: int, world_size: int) -> int:
    """The old transport's busiest rank on the recipe's tensor shapes (analytic): the TP-rank-0 source of each
    stage sends every tensor of its stage whole to every other feeding rank, after its TP all-gather."""
    from megatron_rence.planning.sync_cost import DTYPE_BYTES, feed_ranks, sync_tensors

    p, itemsize = cfg.parallel, DTYPE_BYTES[cfg.model.dtype]
    others = len(feed_ranks(cfg, world_size)) - 1  # the source feeds an engine itself
    sent = [0] * p.pp
    for t in sync_tensors(cfg.model, p, vocab):
        sent[t.stage] += t.numel * itemsize * others + ((p.tp - 1) * t.numel // p.tp * itemsize if t.tp_split else 0)
    return max(sent)


def print_bytes(args) -> None:
    from megatron_rence.config import ParallelConfig
    from megatron_rence.planning.sync_cost import DTYPE_BYTES, rank_bytes, sync_cost, sync_tensors
    from megatron_rence.recipe import load_recipe
    from megatron_rence.weights.routes import Grid

    per = spawn(rank_bytes_4, 4, args)
    model = sync_tensors(_model_cfg(args), ParallelConfig(tp=2, pp=2), args.vocab)
    predicted = rank_bytes(model, Grid.megatron(2, 2, 1), range(4), DTYPE_BYTES[args.dtype], None)
    print("\nbytes per sync on 4 ranks, TP2 x PP2, every rank feeding an engine (GB sent / received per rank):")
    for transport in ("before", "after"):
        cells = ", ".join(f"rank {r} {s / 1e9:.3f}/{v / 1e9:.3f}" for r, (s, v, _) in enumerate(per[transport]))
        busiest = max(s for s, _, _ in per[transport])
        msgs = max(m for _, _, m in per[transport])
        print(f"  {transport:<6} {cells}; busiest sends {busiest / 1e9:.3f} GB in up to {msgs} messages")
    print(f"  cost model (after): busiest sends {max(c.sent for c in predicted) / 1e9:.3f} GB; counted == model: "
          f"{[(s, v) for s, v, _ in per['after']] == [(c.sent, c.received) for c in predicted]}")
    cfg = load_recipe("recipes/rence_70b.yaml", [])
    cost = sync_cost(cfg, cfg.model.vocab_size, 64, 8)
    print(f"recipes/rence_70b.yaml on 8 x 8 GPUs (model {cost.model_bytes / 1e9:.1f} GB): busiest rank sends "
          f"{old_busiest_bytes(cfg, cfg.model.vocab_size, 64) / 1e9:,.0f} GB before (analytic), "
          f"{cost.max_rank_send / 1e9:.1f} GB after (cost model; est. {cost.estimate_s:.2f} s)")


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
    parser.add_argument("--feed", choices=["rank0", "all"], nargs="+", default=["rank0", "all"],
                        help="which ranks feed an engine: rank 0 (CPU engine) or every rank (SGLang groups)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads in all")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--no-bytes", action="store_true", help="skip the 4-rank bytes-per-rank comparison")
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
    header = (f"{'tp':>3} {'feed':>5} {'transport':>9} {'bucket MB':>9} {'buckets':>7} {'GB':>6} | {'stream s':>8} "
              f"{'GB/s':>6} | {'+consume s':>10} {'GB/s':>6} | {'copy_ GB/s':>10} | {'vs copy_: stream':>16} "
              f"{'+consume':>8}")
    rows = []
    for tp in args.tp:
        rows += spawn(measure, tp, args)
    bound = copy_bound(rows[0]["bytes"], device, args.repeats)
    print("parameters on rank 0: " + ", ".join(f"TP={r['tp']} {r['params_per_rank'] / 1e6:.1f} M"
                                               for r in rows if r["bucket_mb"] == args.bucket_mb[0]
                                               and r["transport"] == "after" and r["feed"] == args.feed[0]))
    print(header)
    print("-" * len(header))
    for r in rows:
        gb = r["bytes"] / 1e9
        stream, consume = gb / r["stream_s"], gb / r["consume_s"]
        print(f"{r['tp']:>3} {r['feed']:>5} {r['transport']:>9} {r['bucket_mb']:>9g} {r['buckets']:>7} {gb:>6.3f} | "
              f"{r['stream_s']:>8.3f} {stream:>6.2f} | {r['consume_s']:>10.3f} {consume:>6.2f} | {bound:>10.2f} | "
              f"{stream / bound:>15.2f}x {consume / bound:>7.2f}x", flush=True)
    if not args.no_bytes:
        print_bytes(args)


if __name__ == "__main__":
    main()
