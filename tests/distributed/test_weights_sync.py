"""Weight sync and conversion across layouts on gloo ranks: the per-step stream reproduces the HF checkpoint exactly.

World 4: a tiny HF model imported at TP=2 x PP=2, loaded at TP=2 x PP=2 and streamed with `iter_hf_buckets`
(small buckets) gives every HF tensor once, bit-exact, in buckets that respect `bucket_bytes`; two
destination ranks get identical streams; the TP2xPP2 export is bit-exact. World 2: import at TP=2 and export
at PP=2 (and the reverse) are bit-exact for Llama (untied), Qwen2 (tied, QKV bias) and Qwen3 (QK-norm).
"""
import faulthandler
import multiprocessing
import re
from pathlib import Path

import launcher
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_rence.config import ParallelConfig
from megatron_rence.megatron import checkpoint, parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.weights.convert import export_hf, import_hf, model_config_for
from megatron_rence.weights.sync import iter_hf_buckets
from tests.hf_models import ARCHS, VOCAB, make_hf_model

TIMEOUT = 300
BUCKET_BYTES = 12_000  # fp32: a layer's fc1 (12 KiB) travels alone; qkv (8 KiB), norms and biases share buckets


def allow_child_processes() -> None:
    """Launcher ranks are daemonic; megatron's torch_dist checkpoint writer forks, which daemons may not."""
    multiprocessing.current_process()._config["daemon"] = False


def _setup_rank() -> None:
    faulthandler.dump_traceback_later(TIMEOUT - 60, exit=False)  # a hung collective shows where each rank waits
    torch.set_num_threads(1)
    allow_child_processes()
    dist.init_process_group("gloo")  # owned here: import/export then reuse the world instead of tearing it down


def _stream(cases: list[tuple[str, str]], bucket_bytes: int) -> dict:
    """World 4, per (hf_dir, work): import at TP2xPP2, stream at TP2xPP2 to rank 0, then to ranks 0 and 2;
    export at TP2xPP2."""
    _setup_rank()
    out = {}
    for hf_dir, work in cases:
        root = Path(work) / "megatron"
        import_hf(hf_dir, root, tp=2, pp=2)
        dist.barrier()  # rank 0 copies config.json into root/hf after every rank wrote its shards
        model_cfg = model_config_for(root / "hf")
        layout = ParallelConfig(tp=2, pp=2)
        pstate = parallel.initialize(layout, seed=5)
        chunks = build_model(model_cfg, layout, VOCAB)
        checkpoint.load(root, chunks)
        streams = {"layout": (pstate.tp_rank, pstate.pp_rank)}
        for dst_ranks in ((0,), (0, 2)):
            streams[dst_ranks] = [[(name, tensor.clone()) for name, tensor in bucket] for bucket in
                                  iter_hf_buckets(chunks, model_cfg, VOCAB, bucket_bytes, pstate, dst_ranks)]
        del chunks  # the export's model may get this one's id: the sync plan cache must not mistake it
        parallel.destroy(process_group=False)
        export_hf(root, Path(work) / "exported", tp=2, pp=2)
        dist.barrier()
        out[work] = streams
    return out


def _source_of(hf_name: str) -> str:
    """The Megatron tensor an HF tensor comes from (q/k/v share linear_qkv, gate/up share linear_fc1)."""
    return re.sub(r"\.(q|k|v)_proj\.", ".qkv.", re.sub(r"\.(gate|up)_proj\.", ".fc1.", hf_name))


def _check_buckets(buckets: list, source: dict[str, torch.Tensor], bucket_bytes: int) -> tuple[int, int]:
    """The union is `source` exactly, no name twice, each bucket one Megatron tensor or <= bucket_bytes.

    Returns (buckets of several Megatron tensors, single-tensor buckets over bucket_bytes)."""
    seen: dict[str, torch.Tensor] = {}
    multi = oversize = 0
    for bucket in buckets:
        assert bucket, "empty bucket"
        num_bytes = 0
        for name, tensor in bucket:
            assert name not in seen, f"{name} streamed twice"
            assert tensor.dtype == torch.float32, (name, tensor.dtype)  # the training dtype
            seen[name] = tensor
            num_bytes += tensor.numel() * tensor.element_size()
        sources = {_source_of(name) for name, _ in bucket}
        if len(sources) > 1:
            multi += 1
            assert num_bytes <= bucket_bytes, (num_bytes, [n for n, _ in bucket])
        elif num_bytes > bucket_bytes:
            oversize += 1
    assert sorted(seen) == sorted(source)
    for name, tensor in source.items():
        assert torch.equal(seen[name], tensor), name
    return multi, oversize


def _assert_same_checkpoint(exported: Path, source: dict[str, torch.Tensor]) -> None:
    files = sorted(exported.glob("*.safetensors"))
    assert files and (len(files) == 1 or (exported / "model.safetensors.index.json").is_file())
    back = {}
    for f in files:
        back.update(load_file(f))
    assert sorted(back) == sorted(source)
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_stream_at_tp2_pp2_reproduces_hf_checkpoint(tmp_path):
    archs = ("llama", "qwen2")  # untied: lm_head comes from the last stage; tied: the embedding only, once
    sources = {arch: make_hf_model(arch, tmp_path / arch / "hf") for arch in archs}
    cases = [(str(tmp_path / arch / "hf"), str(tmp_path / arch)) for arch in archs]
    per_rank = launcher.run(_stream, 4, cases, BUCKET_BYTES, timeout=TIMEOUT)
    for arch in archs:
        source, runs = sources[arch], [r[str(tmp_path / arch)] for r in per_rank]
        assert [r["layout"] for r in runs] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        to_rank0 = runs[0][(0,)]
        multi, oversize = _check_buckets(to_rank0, source, BUCKET_BYTES)
        assert multi > 0 and oversize > 0, arch  # both bucket rules were exercised
        assert all(not r[(0,)] for r in runs[1:]), arch  # only destinations get buckets
        for rank in (0, 2):  # two destinations (rank 2 also owns the last stage): the same stream
            got = runs[rank][(0, 2)]
            assert [[n for n, _ in b] for b in got] == [[n for n, _ in b] for b in to_rank0], (arch, rank)
            assert all(torch.equal(t, u) for b, c in zip(got, to_rank0) for (_, t), (_, u) in zip(b, c)), (arch, rank)
        assert not runs[1][(0, 2)] and not runs[3][(0, 2)], arch
        _assert_same_checkpoint(tmp_path / arch / "exported", source)


def _reshard(cases: list[tuple[str, str, dict, dict]]) -> None:
    """World 2: for each (hf_dir, work, import layout, export layout), import then export."""
    _setup_rank()
    for hf_dir, work, import_layout, export_layout in cases:
        root = Path(work) / "megatron"
        import_hf(hf_dir, root, **import_layout)
        dist.barrier()  # side files (config.json) are written by rank 0 after the import
        export_hf(root, Path(work) / "exported", shard_bytes=30_000, **export_layout)
        dist.barrier()


def test_import_and_export_at_different_layouts_are_exact(tmp_path):
    layouts = [("tp2-to-pp2", dict(tp=2), dict(pp=2)), ("pp2-to-tp2", dict(pp=2), dict(tp=2))]
    sources = {arch: make_hf_model(arch, tmp_path / arch / "hf") for arch in ARCHS}
    cases = [(str(tmp_path / arch / "hf"), str(tmp_path / arch / name), a, b)
             for arch in ARCHS for name, a, b in layouts]
    launcher.run(_reshard, 2, cases, timeout=TIMEOUT)
    for arch in ARCHS:
        for name, _, _ in layouts:
            _assert_same_checkpoint(tmp_path / arch / name / "exported", sources[arch])
