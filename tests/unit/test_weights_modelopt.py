"""Our Megatron -> HF converter against NVIDIA Model Optimizer's (`modelopt.torch.export.export_mcore_gpt_to_hf`,
unquantized), tensor by tensor, on the tiny random Llama (untied), Qwen2 (tied, QKV bias) and Qwen3 (QK-norm,
head_dim != hidden / heads) checkpoints.

Found: every tensor is bit-identical except the embedding and untied output layer, which modelopt writes with
Megatron's padded vocabulary (128 rows here) while the config.json it writes keeps vocab_size=90, so its
checkpoint does not load in transformers; ours strips the padding. On a model built with the exact vocabulary
(`quantized_export.unpadded_copy`, what our quantized export hands modelopt) the two exports are identical.
"""
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megatron_rence.config import ParallelConfig
from megatron_rence.megatron import checkpoint
from megatron_rence.megatron.model import build_model
from megatron_rence.megatron.quantized_export import unpadded_copy, write_source_dir
from megatron_rence.weights.convert import export_hf, import_hf, model_config_for
from tests.hf_models import ARCHS, VOCAB, make_hf_model
from tests.megatron_state import single_rank

PADDED = 128  # megatron pads the 90-row vocabulary to a multiple of make_vocab_size_divisible_by (128)


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for name in files:
        out.update(load_file(path / name))
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per arch: ours, modelopt's of the padded model, modelopt's of the unpadded copy."""
    from modelopt.torch.export import export_mcore_gpt_to_hf

    root = tmp_path_factory.mktemp("modelopt")
    out = {}
    for arch in ARCHS:
        hf = root / arch / "hf"
        make_hf_model(arch, hf)
        import_hf(hf, root / arch / "megatron")
        paths = dict(hf=hf, ours=export_hf(root / arch / "megatron", root / arch / "ours"))
        cfg = model_config_for(root / arch / "megatron" / "hf")
        with single_rank(seed=0):
            model = build_model(cfg, ParallelConfig(), VOCAB)[0]
            checkpoint.load(root / arch / "megatron", [model])
            for key, candidate in (("modelopt", model), ("modelopt_unpadded", unpadded_copy(model, cfg, VOCAB))):
                paths[key] = root / arch / key
                source = root / arch / f"{key}-source"  # the config modelopt reads: our to_hf_config's
                write_source_dir(source, cfg, VOCAB, "fp32", hf)
                export_mcore_gpt_to_hf(candidate, str(source), dtype=torch.float32, export_dir=str(paths[key]))
        out[arch] = paths
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_modelopt_export_equals_ours_but_for_vocab_padding(exports, arch):
    ours, theirs = _load_dir(exports[arch]["ours"]), _load_dir(exports[arch]["modelopt"])
    assert sorted(theirs) == sorted(ours)
    tied = ARCHS[arch][2]["tie_word_embeddings"]
    padded = {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert len(ours) == 2 * 9 + 2 + (0 if tied else 1) + (6 if arch == "qwen2" else 0) + (4 if arch == "qwen3" else 0)
    for name, tensor in ours.items():
        if name in padded:
            assert tensor.shape == (VOCAB, 32) and theirs[name].shape == (PADDED, 32), name
            assert torch.equal(theirs[name][:VOCAB], tensor) and not theirs[name][VOCAB:].any(), name
        else:
            assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    assert json.loads((exports[arch]["modelopt"] / "config.json").read_text())["vocab_size"] == VOCAB


@pytest.mark.parametrize("arch", list(ARCHS))
def test_modelopt_export_of_the_unpadded_model_is_ours(exports, arch):
    ours, theirs = _load_dir(exports[arch]["ours"]), _load_dir(exports[arch]["modelopt_unpadded"])
    assert sorted(theirs) == sorted(ours)
    for name, tensor in ours.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name
    source = load_file(exports[arch]["hf"] / "model.safetensors")  # and both are the source checkpoint
    assert all(torch.equal(source[n], t) for n, t in ours.items())


def test_padded_modelopt_export_does_not_load_in_transformers(exports):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # 128 rows vs config.json's 90
        transformers.AutoModelForCausalLM.from_pretrained(exports["llama"]["modelopt"])
    transformers.AutoModelForCausalLM.from_pretrained(exports["llama"]["modelopt_unpadded"])
