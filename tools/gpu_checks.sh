#!/usr/bin/env bash
# The GPU checks of issue 9 as one prepared script, for a session that the `device` tool lends a GPU to
# (one H100/H200, torch + Triton, Python 3.12, no network, no Transformer Engine, no SGLang).
#
#   here (CPU, network to PyPI):  bash tools/gpu_checks.sh fetch      # ~3 MB of wheels into .whl/ (git-ignored)
#   device tool:  run(command="bash tools/gpu_checks.sh run", carry=[".whl"], timeout_s=590)
#
# `run` installs the carried wheels into /tmp/site, then runs, each with its own time limit and its log in
# $OUT: the gpu-marked tests, the log-prob benchmark, the train-step benchmark (1B; 3B with full recompute;
# 7B, which at TP=1 needs ~135 GiB of training state and says so on one GPU), the weight-sync benchmark
# the FP8 rollout mismatch (w8 / w8a8) in bf16, and the trainer memory hand-off of a 1.1B bf16 trainer (GiB freed,
# seconds each way, the SGLang pool an engine would get at each point, a step equal after the round trip), and
# SGLang's fixed cost per weight-sync bucket on a GPU (issue 26; only where SGLang imports). Tests that need TE or
# SGLang skip themselves and say so.
# Written without a GPU to try it on: expect to adjust it in the first session that has one.
set -uo pipefail
cd "$(dirname "$0")/.."
# What the device image lacks (its transformers, tokenizers, safetensors, pyyaml, tqdm, psutil are used as
# they are: transformers 5.x would also need a newer huggingface-hub and its own dependencies).
WHEELS=(megatron-core==0.16.1 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)

case "${1:-}" in
fetch)
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "${WHEELS[@]}"
  du -sh .whl ;;
run)
  OUT=${OUT:-/tmp/gpu_checks}
  mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, megatron.core; print('torch', torch.__version__, 'megatron-core', megatron.core.__version__)" \
    | tee -a "$OUT/device.txt"
  step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -25; }
  step gpu_tests 150 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider -rs
  step bench_logprobs 60 python3 benchmarks/bench_logprobs.py --device cuda --tokens 4096 16384 --vocab 151936
  step bench_train_1b 90 python3 benchmarks/bench_train_step.py --size 1b --seqs 16 --steps 3
  step bench_train_3b 100 python3 benchmarks/bench_train_step.py --size 3b --seqs 8 --steps 2 --recompute full
  step bench_train_7b 20 python3 benchmarks/bench_train_step.py --size 7b --seqs 8 --steps 2  # states why not
  step bench_weight_sync 60 python3 benchmarks/bench_weight_sync.py --device cuda --tp 1 --dtype bf16
  step bench_fp8_mismatch 45 python3 benchmarks/bench_fp8_mismatch.py --device cuda --dtype bf16 \
    --shape qwen2.5-0.5b --prompts 16 --new-tokens 128
  step bench_offload_1b 90 python3 benchmarks/bench_offload.py --size 1b --seqs 8 --seq-len 256
  # issue 26: SGLang's per-bucket cost on a GPU (the CPU figure in planning/sync_phase.py is its floor); needs
  # SGLang 0.5.5.post3 on the machine (the lent ones have none: then it says so and moves on)
  if python3 -c "import sglang" 2>/dev/null; then
    step bench_sglang_update 120 python3 benchmarks/bench_sglang_update.py --device cuda --sizes-mb 4 64 256 1024 \
      --layers 16 --hidden 2048 --ffn 8192 --json "$OUT/bench_sglang_update.json"
  else
    echo "== bench_sglang_update: sglang does not import here; skipped" | tee "$OUT/bench_sglang_update.log"
  fi ;;
*)
  echo "usage: bash tools/gpu_checks.sh fetch|run" >&2; exit 2 ;;
esac
