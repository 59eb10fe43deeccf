"""The collective weight-sync transport on 4 gloo ranks: every engine-feeding rank gets the HF checkpoint bit-exact,
and every rank's bytes sent / received (intra- and inter-node, pretending 2 ranks per node) equal the cost model's.

Layouts (one launch, one after another): DP2 x TP2 feeding two SGLang-style engine groups [0, 1], [2, 3] (every
rank) and feeding the CPU engine (rank 0 only: the other replica moves nothing); TP2 x PP2 with tied embeddings
and QKV bias (Qwen2) feeding every rank, plus its FP8 stream; PP2 x VPP2 x DP2 (TP1). The grid the transport
gathers from the live groups must be megatron's order as the cost model assumes it.

Overlap (weights.overlap_gather, the default): when bucket i reaches the engine, the all-gathers of bucket
i + 1 are already in flight (the byte counter's collectives at each hand-over run one bucket ahead of the
serial stream's), and the stream is bit-for-bit the serial one.
"""
import faulthandler
from pathlib import Path

import launcher
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_rence.config import Config, ParallelConfig
from megatron_rence.megatron import parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.phases import engine_feed_ranks
from megatron_rence.planning.sync_cost import rank_bytes, sync_tensors
from megatron_rence.weights import sync
from megatron_rence.weights.convert import init_from_hf, model_config_for
from megatron_rence.weights.quantize import quantize_bucket
from megatron_rence.weights.routes import ByteCount, Grid
from tests.hf_models import ARCHS, TINY, VOCAB

TIMEOUT = 400
BUCKET_BYTES = 12_000
GPUS_PER_NODE = 2  # pretend: ranks 0-1 and 2-3 are two nodes, so pipeline hops count as inter-node


def _feed(engine: str, tp: int = 1) -> list[int]:
    cfg = Config()
    cfg.rollout.engine = engine
    cfg.rollout.sglang.tp = tp
    return engine_feed_ranks(cfg, 4)


SGLANG_TP2 = _feed("sglang", 2)  # engine groups [0, 1] and [2, 3]: every rank
HF_ENGINE = _feed("hf")  # rank 0
LAYOUTS = [  # (name, arch, parallel layout, engine-feeding ranks, also stream FP8)
    ("dp2xtp2-sglang", "llama", dict(tp=2), SGLANG_TP2, False),
    ("dp2xtp2-hf", "llama", dict(tp=2), HF_ENGINE, False),
    ("tp2xpp2-sglang", "qwen2", dict(tp=2, pp=2), SGLANG_TP2, True),
    ("pp2xvpp2xdp2-sglang", "llama", dict(pp=2, vpp=2), SGLANG_TP2, False),
]


def _make_hf(arch: str, out: Path) -> dict[str, torch.Tensor]:
    """A 4-layer version of tests/hf_models' tiny model (VPP2 x PP2 needs 4 layers), every tensor random."""
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(7)
    model = model_cls(config_cls(**{**TINY, "num_hidden_layers": 4}, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return load_file(Path(out) / "model.safetensors")


def _counts(c: ByteCount) -> tuple:
    return c.sent_intra, c.sent_inter, c.recv_intra, c.recv_inter, c.collectives


def _stream(chunks, model_cfg, pstate, dst, count: ByteCount, overlap: bool):
    """The buckets (cloned) and this rank's all-gathers started so far at each bucket's hand-over."""
    buckets, started = [], []
    for b in sync.iter_hf_buckets(chunks, model_cfg, VOCAB, BUCKET_BYTES, pstate, dst, count=count,
                                  gpus_per_node=GPUS_PER_NODE, overlap=overlap):
        started.append(count.collectives)
        buckets.append([(n, t.clone()) for n, t in b])
    return buckets, started


def _run(cases: list[tuple[str, str, dict, list[int], bool]]) -> dict:
    faulthandler.dump_traceback_later(TIMEOUT - 60, exit=False)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {}
    for name, hf_dir, layout_kw, dst, fp8 in cases:
        model_cfg = model_config_for(hf_dir)
        layout = ParallelConfig(**layout_kw)
        pstate = parallel.initialize(layout, seed=3)
        chunks = build_model(model_cfg, layout, VOCAB)
        init_from_hf(chunks, model_cfg, VOCAB, pstate)
        count = ByteCount()
        buckets, ahead = _stream(chunks, model_cfg, pstate, dst, count, overlap=True)
        serial, behind = _stream(chunks, model_cfg, pstate, dst, ByteCount(), overlap=False)
        result = {"buckets": buckets, "count": _counts(count), "messages": count.messages,
                  "grid": sync._plan(chunks, pstate, model_cfg.tie_word_embeddings)[1].ranks,
                  "collectives_at_handover": (ahead, behind),
                  "serial_equal": len(serial) == len(buckets) and all(
                      [n for n, _ in a] == [n for n, _ in b] and all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))
                      for a, b in zip(serial, buckets))}
        if fp8:  # quantised tensor by tensor in the stream == the whole bucket quantised afterwards
            streamed = list(sync.iter_hf_buckets(chunks, model_cfg, VOCAB, BUCKET_BYTES, pstate, dst, fp8=True))
            result["fp8_equal"] = len(streamed) == len(buckets) and all(
                [n for n, _ in a] == [n for n, _ in quantize_bucket(b)]
                and all(torch.equal(x.view(torch.uint8) if x.dtype.itemsize == 1 else x,
                                    y.view(torch.uint8) if y.dtype.itemsize == 1 else y)
                        for (_, x), (_, y) in zip(a, quantize_bucket(b)))
                for a, b in zip(streamed, buckets))
        out[name] = result
        del chunks
        parallel.destroy(process_group=False)
        dist.barrier()
    return out


def test_every_feeding_rank_gets_the_checkpoint_and_bytes_match_the_cost_model(tmp_path):
    sources = {arch: _make_hf(arch, tmp_path / arch) for arch in ("llama", "qwen2")}
    cases = [(name, str(tmp_path / arch), layout, dst, fp8) for name, arch, layout, dst, fp8 in LAYOUTS]
    per_rank = launcher.run(_run, 4, cases, timeout=TIMEOUT)
    assert SGLANG_TP2 == [0, 1, 2, 3] and HF_ENGINE == [0]
    for name, arch, layout_kw, dst, fp8 in LAYOUTS:
        source = sources[arch]
        model_cfg = model_config_for(tmp_path / arch)
        layout = ParallelConfig(**layout_kw)
        dp = 4 // (layout.tp * layout.pp)
        grid = Grid.megatron(layout.tp, layout.pp, dp)
        for rank, result in enumerate(r[name] for r in per_rank):
            assert result["grid"] == grid.ranks, name  # megatron's tp-cp-ep-dp-pp order
            if rank not in dst:
                assert result["buckets"] == [], (name, rank)
                continue
            seen = {}
            for bucket in result["buckets"]:
                for hf_name, tensor in bucket:
                    assert hf_name not in seen, (name, rank, hf_name)
                    seen[hf_name] = tensor
            assert sorted(seen) == sorted(source), (name, rank)
            for hf_name, tensor in source.items():
                assert torch.equal(seen[hf_name], tensor), (name, rank, hf_name)
            if fp8:
                assert result["fp8_equal"], (name, rank)
            assert result["serial_equal"], (name, rank)
            ahead, behind = result["collectives_at_handover"]
            assert len(ahead) == len(behind) > 1, (name, rank)
            assert ahead == behind[1:] + behind[-1:], (name, rank, ahead, behind)  # one bucket ahead
            if layout.tp > 1 and dst != HF_ENGINE:
                assert ahead[0] > behind[0], (name, rank)
        expected = rank_bytes(sync_tensors(model_cfg, layout, VOCAB), grid, dst, 4, GPUS_PER_NODE)
        got = [r[name]["count"] for r in per_rank]
        assert got == [_counts(c) for c in expected], (name, got, expected)
        if dst == HF_ENGINE:  # the second data replica (ranks 2, 3) moves nothing; rank 0 only receives
            assert got[2] == got[3] == (0, 0, 0, 0, 0) and got[0][0] == got[0][1] == 0
            assert got[1][0] > 0 and per_rank[1][name]["messages"] > 0
        else:  # every rank both sends and receives; pipeline hops cross "nodes"
            assert all(g[0] + g[1] > 0 and g[2] + g[3] > 0 for g in got), name
            assert all(g[1] > 0 for g in got) == (layout.pp > 1), name

