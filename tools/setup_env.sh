#!/usr/bin/env bash
# Create .venv with everything the CPU demo and the tests need. Idempotent: re-runs only when setup.py changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.installed
HASH=$(sha256sum setup.py tools/setup_env.sh | sha256sum | cut -c1-16)
if [[ -f $STAMP && "$(cat $STAMP)" == "$HASH" ]]; then exit 0; fi
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch first, so that nothing pulls the multi-GB CUDA wheels.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/python -m pip install -q -e ".[test,parquet,plot,export]"
echo "$HASH" > $STAMP
