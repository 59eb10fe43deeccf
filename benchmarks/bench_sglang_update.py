"""SGLang's side of a weight sync, measured on its real engine: fixed cost per bucket and cost per byte.

    .venv-sglang/bin/python benchmarks/bench_sglang_update.py [--sizes-mb 0.002 1 8 32 64] [--repeats 7]
        [--layers 8 --hidden 512 --ffn 1536] [--device cpu|cuda] [--json OUT]

(`bash tools/setup_sglang_env.sh` builds .venv-sglang; on CPU the test-only import shims of
tests/sglang_shims go on the path, as in the `sglang` test tier.) A Llama-shaped model directory is written
(random weights, the synthetic tokenizer) and our adapter starts SGLang 0.5.5.post3's `sglang.Engine` on it
as train.py does (`SGLangEngine.from_config`, dummy weights); buckets of the model's own HF tensors of
about each size (consecutive tensors, the bucket nearest the size) go through our adapter
(`rollout.sglang_engine.SGLangEngine.update_weights`: split by dtype, flatten, SGLang's payload and
MultiprocessingSerializer, then `UpdateWeightsFromTensorReqInput(load_format="flattened_bucket")` to the
tokenizer manager -> ZMQ -> scheduler -> TP worker -> model runner: rebuild the flattened bucket and
`load_weights`). Per bucket size, the median of `--repeats` calls:
  total     one `update_weights` call, as the trainer pays it
  ours      flatten + payload + serialize, timed on the same bucket outside the call (our side; the TP
            all-gather is benchmarks/bench_weight_sync.py's and the cost model's)
  sglang    total - ours: the message, the scheduler, the deserialisation and load_weights
A least-squares line over the sizes gives the fixed seconds per bucket and the seconds per byte of each.
Then our FP8 block quantisation (weights/quantize.py) of a linear weight, in copies of the same bytes
(`copy_` of the bf16 weight): the cost model's FP8_COPIES.

The CPU fixed cost is Python, ZMQ and process hand-offs: a GPU adds `cudaIpcOpenMemHandle`, CUDA
synchronisations and its own Python on top, so the CPU figure is a floor for the GPU's per-bucket cost.
The per-byte figure on CPU is memcpy over shared memory and does not carry over (on a GPU the bytes move at
HBM speed: planning/sync_phase.py). Checked: after the last bucket the engine's weights equal the pushed ones
(`get_weights_by_name` on one tensor), else exit status 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _shims_on_path(device: str) -> None:
    """On CPU SGLang needs the test tier's import shims (sgl_kernel, vllm), in this process and its children."""
    import os

    if device != "cpu":
        return
    shims = str(REPO / "tests" / "sglang_shims")
    sys.path.insert(0, shims)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (shims, os.environ.get("PYTHONPATH")) if p)


def free_port() -> int:
    """A free TCP port with a free successor: the sglang tier's helper (tests/sglang/engine_setup.py)."""
    sys.path.insert(0, str(REPO))
    from tests.sglang.engine_setup import free_port as tier_free_port

    return tier_free_port()


def make_engine(args, run_dir: Path):
    """Our adapter as train.py builds it (SGLangEngine.from_config) on a Llama shape, and that model's HF
    tensors (random, fp32, checkpoint order) to push."""
    from transformers import LlamaForCausalLM

    from megatron_rence.config import Config, ModelConfig
    from megatron_rence.data.tokenizer import build_synthetic_tokenizer
    from megatron_rence.rollout.sglang_engine import SGLangEngine
    from megatron_rence.weights.hf_config import to_hf_config

    cfg = Config()
    cfg.model = ModelConfig(arch="llama", tokenizer="synthetic", num_layers=args.layers, hidden_size=args.hidden,
                            ffn_hidden_size=args.ffn, num_attention_heads=args.hidden // 64,
                            num_query_groups=args.hidden // 128, max_position_embeddings=256, dtype="fp32")
    cfg.train.device, cfg.train.run_dir = args.device, str(run_dir)
    s = cfg.rollout.sglang
    s.enable_memory_saver, s.base_port, s.request_timeout_s = False, free_port(), 1200.0
    s.mem_fraction_static = 0.05 if args.device == "cpu" else 0.3
    s.extra_args = {"max_total_tokens": "4096"}
    if args.device == "cpu":
        s.extra_args["disable_overlap_schedule"] = "true"
    tokenizer = build_synthetic_tokenizer()
    hf_config = to_hf_config(cfg.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    tensors = {n: t.detach().clone() for n, t in LlamaForCausalLM(hf_config).state_dict().items()}
    if hf_config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return SGLangEngine.from_config(cfg, hf_config, tokenizer), tensors


def buckets_of(tensors: dict[str, torch.Tensor], size: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors in buckets of about `size` bytes (weights.plan.make_buckets' rule)."""
    out, current, nbytes = [], [], 0
    for name, t in tensors.items():
        if current and nbytes + t.numel() * t.element_size() > size:
            out.append(current)
            current, nbytes = [], 0
        current.append((name, t))
        nbytes += t.numel() * t.element_size()
    if current:
        out.append(current)
    return out


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y over x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def ours_seconds(bucket, serialize) -> float:
    """Our side of one call: split by dtype, flatten, SGLang's payload object, serialize."""
    from megatron_rence.rollout.sglang_transport import flatten, sglang_payload, split_by_dtype

    start = time.perf_counter()
    for named in split_by_dtype(bucket):
        flat, metas = flatten(named)
        serialize(sglang_payload(flat, metas))
    return time.perf_counter() - start


def fp8_copies(repeats: int) -> float:
    """Block FP8 quantisation of a 4096 x 4096 bf16 weight, in copies of its bytes (median of repeats)."""
    from megatron_rence.weights.quantize import quantize_block_fp8

    w = torch.randn(4096, 4096).to(torch.bfloat16)
    dst = torch.empty_like(w)
    q, c = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        quantize_block_fp8(w)
        q.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(w)
        c.append(time.perf_counter() - t0)
    return statistics.median(q) / statistics.median(c)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.002, 1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    _shims_on_path(args.device)
    from megatron_rence.rollout.sglang_transport import sglang_serialize

    t0 = time.perf_counter()
    engine, tensors = make_engine(args, Path(tempfile.mkdtemp(prefix="bench_sglang_update_")))
    print(f"engine started in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.device == "cuda":
        tensors = {n: t.cuda() for n, t in tensors.items()}
    total_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}: {len(tensors)} tensors, "
          f"{total_bytes / 1e6:.1f} MB fp32; device {args.device}, torch threads {torch.get_num_threads()}",
          flush=True)
    rows, version = [], 0
    try:
        for mb in args.sizes_mb:
            buckets = buckets_of(tensors, int(mb * 1e6))
            bucket = min(buckets, key=lambda b: abs(sum(t.numel() * t.element_size() for _, t in b) - mb * 1e6))
            nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
            totals, ours = [], []
            engine.update_weights(bucket, version)  # warm-up
            for _ in range(args.repeats):
                version += 1
                start = time.perf_counter()
                engine.update_weights(bucket, version)
                totals.append(time.perf_counter() - start)
                ours.append(ours_seconds(bucket, sglang_serialize))
            total, our = statistics.median(totals), statistics.median(ours)
            rows.append({"mb": nbytes / 1e6, "tensors": len(bucket), "total_s": total, "ours_s": our,
                         "sglang_s": total - our})
            print(f"bucket {nbytes / 1e6:8.2f} MB, {len(bucket):3d} tensors: total {total * 1e3:8.2f} ms  ours "
                  f"{our * 1e3:7.2f} ms  sglang {(total - our) * 1e3:8.2f} ms  (median of {args.repeats})", flush=True)
        for bucket in buckets_of(tensors, 64 * 10**6):  # every tensor once, then check one came through
            engine.update_weights(bucket, version + 1)
        name = "model.layers.0.mlp.down_proj.weight"
        got = engine.engine.get_weights_by_name(name, truncate_size=tensors[name].numel())
        same = torch.allclose(torch.as_tensor(got).reshape(-1).float(), tensors[name].reshape(-1).float().cpu())
    finally:
        engine.shutdown()
    out = {"device": args.device, "rows": rows}
    for key in ("total_s", "ours_s", "sglang_s"):
        fixed, per_byte = fit([(r["mb"] * 1e6, r[key]) for r in rows])
        out[key.replace("_s", "")] = {"fixed_ms": fixed * 1e3, "ms_per_mb": per_byte * 1e9}
        print(f"fit {key[:-2]:>6}: {fixed * 1e3:7.2f} ms per bucket + {per_byte * 1e9:7.3f} ms per MB")
    out["fp8_copies"] = fp8_copies(args.repeats)
    print(f"FP8 block quantisation of a 4096 x 4096 bf16 weight: {out['fp8_copies']:.1f} copies of its bytes")
    print(f"engine weights equal the pushed ones after the sync: {same}")
    if args.device == "cpu":
        print("The CPU fixed cost per bucket is a floor for the GPU's (which adds CUDA IPC handles and "
              "synchronisations); the per-MB figure is CPU memcpy and does not carry over.")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
