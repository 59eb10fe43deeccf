"""A model folder written by our main environment (transformers 5.x) reads the same under SGLang's transformers
4.57.1: the RoPE base (plain and Llama-3 scaled) and the tokenizer's ids. Before, 4.57.1 read rope_theta 10000
(5.x writes the base only inside `rope_parameters`) and could not load the `TokenizersBackend` class."""
import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import transformers

from megatron_rence.data.tokenizer import build_synthetic_tokenizer

pytestmark = pytest.mark.sglang
REPO = Path(__file__).resolve().parents[2]
MAIN_PY = REPO / ".venv" / "bin" / "python"  # make test builds it before this tier

WRITE = textwrap.dedent("""
    import sys, transformers
    from megatron_rence.config import ModelConfig
    from megatron_rence.data.tokenizer import build_synthetic_tokenizer
    from megatron_rence.rollout.sglang_engine import write_model_dir
    from megatron_rence.weights.hf_config import to_hf_config

    assert int(transformers.__version__.split(".")[0]) >= 5, transformers.__version__
    tok = build_synthetic_tokenizer()
    for name, scaled in (("plain", False), ("llama3", True)):
        m = ModelConfig(arch="llama", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                        num_query_groups=2, max_position_embeddings=16384, rotary_base=500000.0,
                        rope_scaling=scaled, rope_scaling_factor=8.0)
        write_model_dir(to_hf_config(m, len(tok)), tok, __import__("pathlib").Path(sys.argv[1]) / name, fp8=False)
""")


def test_folders_written_under_transformers_5_read_the_same_under_4_57_1(tmp_path):
    assert transformers.__version__ == "4.57.1"
    if not MAIN_PY.exists():
        pytest.fail(f"{MAIN_PY} is missing: run `make env` (make test builds it before this tier)")
    proc = subprocess.run([str(MAIN_PY), "-c", WRITE, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = build_synthetic_tokenizer()("<|user|>12+(3*4)=\\boxed{7}")["input_ids"]
    for name in ("plain", "llama3"):
        config = transformers.AutoConfig.from_pretrained(tmp_path / name)
        assert config.rope_theta == 500000.0, (name, json.loads((tmp_path / name / "config.json").read_text()))
        if name == "llama3":
            assert config.rope_scaling["rope_type"] == "llama3" and config.rope_scaling["factor"] == 8.0
        else:
            assert config.rope_scaling is None
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
        assert tokenizer("<|user|>12+(3*4)=\\boxed{7}")["input_ids"] == ids
