#!/usr/bin/env bash
# Create .venv-sglang: SGLang 0.5.5.post3's real engine on CPU, for the `sglang` test tier and
# `rollout.engine=sglang` on a CPU machine. Idempotent: re-runs only when this script or setup.py changes.
#
# Why a second venv: SGLang 0.5.5.post3 pins transformers==4.57.1 (with 5.x it silently reads the wrong
# RoPE base) and its PyPI metadata pulls CUDA wheels (torch 2.8.0+cu, sgl-kernel, flashinfer). Here we
# install the CPU torch, then sglang, torchao and xgrammar with --no-deps, then the runtime packages they
# import, listed explicitly. sgl-kernel and vllm are NOT installed: the tests put import shims from
# tests/sglang_shims/ on PYTHONPATH (tests/conftest.py does it); those shims raise if anything is called.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sglang
STAMP=$VENV/.installed
HASH=$(sha256sum setup.py tools/setup_sglang_env.sh | sha256sum | cut -c1-16)
if [[ -f $STAMP && "$(cat $STAMP)" == "$HASH" ]]; then exit 0; fi
echo "setup_sglang_env: building $VENV (first use: ~2-4 min, ~2.3 GB)" >&2
[[ -d $VENV ]] || "$PY" -m venv $VENV
VPY=$VENV/bin/python
$VPY -m pip install -q --upgrade pip
# The CPU build of torch first, so that nothing pulls the multi-GB CUDA wheels.
if ! $VPY -c "import torch" 2>/dev/null; then
  $VPY -m pip install -q "torch==2.13.0" || $VPY -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
# SGLang and the two packages whose metadata pins CUDA builds of torch: without their dependencies.
$VPY -m pip install -q --no-deps "sglang==0.5.5.post3" "torchao==0.9.0" "xgrammar==0.1.25"
# What SGLang 0.5.5.post3 imports on the CPU path (its own pins where it has them), our package with
# its test extra, and transformers at SGLang's pin (4.57.1), all in one resolve.
$VPY -m pip install -q -e ".[test]" \
  "transformers==4.57.1" "triton==3.4.0" "openai==2.6.1" "uvloop==0.21.0" "openai-harmony==0.0.4" \
  "llguidance>=0.7.11,<0.8.0" "blobfile==3.0.0" \
  IPython aiohttp compressed-tensors dill einops fastapi huggingface_hub interegular msgspec ninja \
  orjson packaging partial_json_parser pillow "prometheus-client>=0.20.0" psutil pybase64 pydantic \
  python-multipart "pyzmq>=25.1.2" requests scipy sentencepiece setproctitle tiktoken tqdm uvicorn
# Guard against a resolver that moved the pins.
$VPY - <<'EOF'
import importlib.metadata as md
want = {"sglang": "0.5.5.post3", "transformers": "4.57.1", "torch": "2.13.0"}
got = {k: md.version(k) for k in want}
bad = {k: v for k, v in got.items() if not v.startswith(want[k])}
if bad:
    raise SystemExit(f"setup_sglang_env: wrong versions {bad}, want {want}")
EOF
echo "$HASH" > $STAMP
