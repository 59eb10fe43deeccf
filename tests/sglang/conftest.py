"""The `sglang` tier: SGLang 0.5.5.post3's real engine on CPU, run from .venv-sglang (tools/setup_sglang_env.sh).

`make test` runs this folder with `.venv-sglang/bin/python -m pytest -m sglang tests/sglang` and
RENCE_SGLANG_TIER=1; there a missing sglang is an error. In the main venv (no sglang) this folder is not
collected (its tests are marked `sglang` and deselected there anyway).

The test-only import shims (tests/sglang_shims: `sgl_kernel`, `vllm`) go on sys.path and PYTHONPATH, so
SGLang's spawned scheduler / detokenizer and the `rence-train` subprocesses import them too.
"""
import importlib.util
import os
import sys
from pathlib import Path

SHIMS = str(Path(__file__).resolve().parents[1] / "sglang_shims")
if SHIMS not in sys.path:
    sys.path.insert(0, SHIMS)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SHIMS, os.environ.get("PYTHONPATH")) if p)

collect_ignore_glob: list[str] = []
if importlib.util.find_spec("sglang") is None:
    if os.environ.get("RENCE_SGLANG_TIER"):
        raise RuntimeError(f"RENCE_SGLANG_TIER is set but sglang does not import in {sys.executable}: "
                           "run `bash tools/setup_sglang_env.sh` and use .venv-sglang/bin/python")
    collect_ignore_glob = ["test_*.py"]
