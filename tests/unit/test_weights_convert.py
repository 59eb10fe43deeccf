"""HF safetensors -> Megatron dist checkpoint -> HF at TP=1 (one process), for tiny random Llama / Qwen2 / Qwen3.

Checked: the round trip is bit-exact (same names, dtypes and values) and config.json keeps the
architecture; tokenizer files travel with the checkpoint; the imported Megatron model gives the
transformers logits; a sharded export (index + several shards) loads with `from_pretrained`; user errors
(paths, model_type, shapes, missing tensors, --tp) raise with the offending name and the CLIs exit 2.
"""
import gc
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_rence.config import ModelConfig, ParallelConfig
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.megatron import checkpoint, cpu_compat, parallel
from megatron_rence.megatron.model import build_model
from megatron_rence.weights import sync
from megatron_rence.weights.convert import HFCheckpoint, TOKENIZER_FILES, export_hf, import_hf, model_config_for
from tests.hf_models import ARCHS, VOCAB, make_hf_model

ROOT = Path(__file__).resolve().parents[2]
ARCH_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
               "tie_word_embeddings", "rope_parameters", "attention_bias", "dtype")


@pytest.fixture(scope="module", autouse=True)
def restore_cpu_compat():
    was_applied = cpu_compat.is_applied()
    yield
    if not was_applied:
        cpu_compat.restore()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    for arch in ARCHS:
        make_hf_model(arch, root / arch, with_tokenizer=arch == "llama")  # tokenizer files travel when present
    return {arch: root / arch for arch in ARCHS}


@pytest.fixture(scope="module")
def converted(hf_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per arch: the HF source, its import (TP=1) and the export of that import."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for arch, hf in hf_dirs.items():
        ckpt = import_hf(hf, root / arch / "megatron")
        assert ckpt == root / arch / "megatron" / "iter_0000000" and ckpt.is_dir()
        out[arch] = dict(hf=hf, megatron=root / arch / "megatron",
                         exported=export_hf(root / arch / "megatron", root / arch / "exported"))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_is_bit_exact(converted, arch):
    paths = converted[arch]
    source, back = load_file(paths["hf"] / "model.safetensors"), load_file(paths["exported"] / "model.safetensors")
    assert sorted(back) == sorted(source)
    assert ("lm_head.weight" in source) == (not ARCHS[arch][2]["tie_word_embeddings"])
    for name, tensor in source.items():
        assert back[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(back[name], tensor), name
    assert not (paths["exported"] / "model.safetensors.index.json").exists()


def _arch_fields(hf_dir: Path) -> dict:
    config = json.loads((hf_dir / "config.json").read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])  # Qwen2 omits it
    return {k: config.get(k) for k in ARCH_FIELDS}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_config_and_side_files_round_trip(converted, arch):
    paths = converted[arch]
    source = _arch_fields(paths["hf"])
    for where in (paths["megatron"] / "hf", paths["exported"]):
        assert _arch_fields(where) == source, where
    side_files = [f for f in TOKENIZER_FILES if (paths["hf"] / f).is_file()]  # generation config + tokenizer
    assert "generation_config.json" in side_files
    assert ("tokenizer.json" in side_files) == (arch == "llama")
    for name in side_files:
        for where in (paths["megatron"] / "hf", paths["exported"]):
            assert (where / name).read_bytes() == (paths["hf"] / name).read_bytes(), where / name
    assert sorted(f for f in TOKENIZER_FILES if (paths["exported"] / f).exists()) == sorted(side_files)
    if arch == "llama":
        tokenizer = transformers.AutoTokenizer.from_pretrained(paths["exported"])
        assert tokenizer("1+2=3")["input_ids"] == build_synthetic_tokenizer()("1+2=3")["input_ids"]


@pytest.fixture()
def single_process():
    state = parallel.initialize(ParallelConfig(), seed=0)
    yield state
    parallel.destroy()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_imported_model_gives_transformers_logits(converted, single_process, arch):
    paths = converted[arch]
    model_cfg = model_config_for(paths["megatron"] / "hf")
    assert model_cfg.dtype == "fp32" and model_cfg.vocab_size == VOCAB
    model = build_model(model_cfg, ParallelConfig(), VOCAB)[0].eval()
    checkpoint.load(paths["megatron"], [model])
    hf = ARCHS[arch][1].from_pretrained(paths["hf"]).eval()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens, torch.arange(16).expand(2, -1), None)
        theirs = hf(input_ids=tokens).logits
    assert ours.shape[-1] == 128 and theirs.abs().max() > 0.5
    torch.testing.assert_close(ours[..., :VOCAB], theirs, rtol=1e-5, atol=1e-5)


def test_stream_plan_is_per_model(single_process):
    """The sync plan cache holds models weakly: a model built after another was freed gets its own plan even
    when it reuses the freed one's id (a stale plan skipped the planning collective on one rank: deadlock)."""
    before = len(sync._PLAN_CACHE)
    for hidden in (32, 64, 32):
        model_cfg = ModelConfig(num_layers=1, hidden_size=hidden, ffn_hidden_size=64, num_attention_heads=4,
                                num_query_groups=2, dtype="fp32")
        chunks = build_model(model_cfg, ParallelConfig(), VOCAB)
        streamed = dict(t for b in sync.iter_hf_buckets(chunks, model_cfg, VOCAB, 1 << 20, single_process) for t in b)
        assert streamed["model.norm.weight"].shape == (hidden,) and len(sync._PLAN_CACHE) == before + 1
        del chunks, streamed
        gc.collect()
        assert len(sync._PLAN_CACHE) == before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sharded_export_loads_in_transformers(converted, tmp_path, arch):
    paths = converted[arch]
    out = export_hf(paths["megatron"], tmp_path / "sharded", shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not list(out.glob("*.tmp"))
    source = load_file(paths["hf"] / "model.safetensors")
    assert sorted(index["weight_map"]) == sorted(source)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in source.values())
    reader = HFCheckpoint(out)  # the importer's reader follows the index too
    assert all(torch.equal(reader.get(name), tensor) for name, tensor in source.items())
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is ARCHS[arch][1]
    state = loaded.state_dict()
    for name, tensor in source.items():
        assert torch.equal(state[name], tensor), name
    if ARCHS[arch][2]["tie_word_embeddings"]:
        assert torch.equal(state["lm_head.weight"], source["model.embed_tokens.weight"])


def _copy_of(hf_dirs, tmp_path: Path, arch: str = "llama") -> Path:
    return Path(shutil.copytree(hf_dirs[arch], tmp_path / f"{arch}-copy"))


def test_missing_directory_and_no_safetensors(hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.*does not exist"):
        import_hf(tmp_path / "absent", tmp_path / "out")
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    shutil.copyfile(hf_dirs["llama"] / "config.json", only_config / "config.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        import_hf(only_config, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="checkpoint path .*absent does not exist"):
        export_hf(tmp_path / "absent", tmp_path / "out")


def test_unknown_model_type(hf_dirs, tmp_path):
    src = _copy_of(hf_dirs, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        import_hf(src, tmp_path / "out")


def test_shape_mismatch_names_megatron_parameter_and_hf_tensors(hf_dirs, tmp_path):
    src = _copy_of(hf_dirs, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError) as exc:
        import_hf(src, tmp_path / "out")
    message = str(exc.value)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in message, message
    assert "model.layers.0.mlp.gate_proj.weight [48, 32]" in message and "model.layers.0.mlp.up_proj.weight" in message
    assert "(128, 32)" in message, message  # what the model expects: [gate; up] of 64 rows each
    assert not (tmp_path / "out" / "latest").exists()


def test_missing_tensor_is_named(hf_dirs, tmp_path):
    src = _copy_of(hf_dirs, tmp_path)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.self_attention\.linear_qkv\.weight: .*"
                                         r"no tensor 'model\.layers\.1\.self_attn\.v_proj\.weight'"):
        import_hf(src, tmp_path / "out")


def test_tp_must_divide_heads(converted, tmp_path):
    with pytest.raises(ValueError, match="--tp=3 does not divide the model's num_attention_heads=4"):
        import_hf(converted["llama"]["hf"], tmp_path / "out", tp=3)
    with pytest.raises(ValueError, match="--tp=3 does not divide the model's num_attention_heads=4"):
        export_hf(converted["llama"]["megatron"], tmp_path / "out", tp=3)
    with pytest.raises(ValueError, match="--pp=3 does not divide the model's num_layers=2"):
        import_hf(converted["llama"]["hf"], tmp_path / "out", pp=3)


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors_exit_2(converted, tmp_path, capsys):
    convert, export = _tool("convert_hf_to_megatron"), _tool("export_megatron_to_hf")
    assert convert.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: HF checkpoint directory")
    assert convert.main([str(converted["llama"]["hf"]), str(tmp_path / "out"), "--tp", "3"]) == 2
    assert "error: --tp=3 does not divide" in capsys.readouterr().err
    assert export.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint path")
    assert export.main([str(converted["llama"]["megatron"]), str(tmp_path / "out"), "--pp", "3"]) == 2
    assert "error: --pp=3 does not divide" in capsys.readouterr().err
    # the real exit status of the script
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf_to_megatron.py"), str(tmp_path / "absent"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: HF checkpoint directory" in proc.stderr, proc.stderr


def test_export_of_a_checkpoint_without_manifest_needs_allow_unverified(converted, tmp_path, capsys):
    # a checkpoint from before checksums (no manifest.json): refused with a message naming the tool's flag, and
    # exported with --allow-unverified (the exporter only reads: nothing is renamed or deleted)
    import shutil

    src = tmp_path / "old_run"
    shutil.copytree(converted["llama"]["megatron"], src)
    (src / "iter_0000000" / "manifest.json").unlink()
    export = _tool("export_megatron_to_hf")
    assert export.main([str(src), str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "has no manifest.json" in err and "--allow-unverified" in err, err
    assert export.main([str(src), str(tmp_path / "out"), "--allow-unverified"]) == 0
    ours = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(converted["llama"]["exported"] / "model.safetensors")
    assert ours.keys() == want.keys() and all(torch.equal(ours[k], want[k]) for k in want)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in converted["llama"]["megatron"].iterdir())
