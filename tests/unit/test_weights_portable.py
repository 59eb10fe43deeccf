"""Model folders we write read the same under transformers 5.x (ours) and 4.57.1 (SGLang's): a top-level
`rope_theta` (+ 4.x `rope_scaling`) next to 5.x's `rope_parameters`, and a tokenizer class 4.57.1 knows.
The 4.57.1 side is checked in the sglang tier (tests/sglang/test_portable_folders.py)."""
import json

import pytest
import transformers

from megatron_rence.config import ModelConfig
from megatron_rence.data.tokenizer import build_synthetic_tokenizer
from megatron_rence.rollout.sglang_engine import write_model_dir
from megatron_rence.weights.hf_config import to_hf_config
from megatron_rence.weights.portable import make_portable, portable_config

MODEL = ModelConfig(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, max_position_embeddings=128, rotary_base=50000.0)


def test_portable_config_by_hand():
    plain = {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    assert portable_config(plain) == {**plain, "rope_theta": 500000.0}
    llama3 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}
    assert portable_config(llama3)["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert portable_config({"rope_theta": 1e6}) == {"rope_theta": 1e6}  # a 4.x config stays as it is
    with pytest.raises(ValueError, match="rope_theta=10000.0 disagrees"):
        portable_config({"rope_theta": 10000.0, "rope_parameters": {"rope_theta": 5e5}})


def test_engine_model_dir_carries_rope_theta_and_a_4x_tokenizer_class(tmp_path):
    tokenizer = build_synthetic_tokenizer()
    hf_config = to_hf_config(MODEL, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    write_model_dir(hf_config, tokenizer, tmp_path, fp8=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 50000.0 and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "PreTrainedTokenizerFast", None)
    # ours (5.x or 4.x) reads the same back
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    rope = getattr(back, "rope_parameters", None) or {"rope_theta": back.rope_theta}
    assert rope["rope_theta"] == 50000.0
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again("1+2=(3)")["input_ids"] == tokenizer("1+2=(3)")["input_ids"]


def test_make_portable_is_idempotent_and_keeps_5x_reading(tmp_path):
    m = ModelConfig(**{**MODEL.__dict__, "rope_scaling": True, "rope_scaling_factor": 8.0,
                       "max_position_embeddings": 16384})
    to_hf_config(m, 31).save_pretrained(tmp_path)
    before = transformers.AutoConfig.from_pretrained(tmp_path)
    make_portable(tmp_path)
    first = (tmp_path / "config.json").read_text()
    make_portable(tmp_path)
    assert (tmp_path / "config.json").read_text() == first
    after = transformers.AutoConfig.from_pretrained(tmp_path)
    for key in ("rope_parameters", "rope_theta", "rope_scaling"):
        assert getattr(after, key, None) == getattr(before, key, None), key


def test_engine_model_dir_needs_architectures(tmp_path):
    tokenizer = build_synthetic_tokenizer()
    hf_config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match="no `architectures`"):
        write_model_dir(hf_config, tokenizer, tmp_path / "m", fp8=False)
