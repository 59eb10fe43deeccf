#!/usr/bin/env bash
# `make test`: the main tier (.venv, everything but the gpu and sglang markers), then the sglang tier
# (.venv-sglang, built on first use by tools/setup_sglang_env.sh: SGLang's real engine on CPU).
# Extra pytest arguments ($@, from `make test ARGS=...`) go to both tiers. pytest's exit code 5 ("no tests
# ran") fails the run, except for one tier when arguments were given and the other tier ran tests (e.g.
# `-k flush` may select tests in only one of them).
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -m "not gpu and not sglang" "$@"
main=$?
bash tools/setup_sglang_env.sh || exit 1
start=$(date +%s)
RENCE_SGLANG_TIER=1 .venv-sglang/bin/python -m pytest -m sglang tests/sglang "$@"
tier=$?
echo "sglang tier: $(( $(date +%s) - start )) s (exit $tier)"
if [[ $# -gt 0 ]]; then
  [[ $main -eq 5 && $tier -eq 0 ]] && main=0
  [[ $tier -eq 5 && $main -eq 0 ]] && tier=0
fi
[[ $main -eq 0 && $tier -eq 0 ]] || { echo "make test failed: main tier exit $main, sglang tier exit $tier" >&2; exit 1; }
