# The two Quickstart commands: `make demo` (the CPU demo run) and `make test` (the test suite).
# Both create .venv on first use (tools/setup_env.sh); `make test` also builds .venv-sglang (SGLang's real
# engine on CPU, tools/setup_sglang_env.sh) for its second tier. Nothing else needs installing by hand.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: env env-sglang demo demo-real test test-main test-sglang test-slurm test-gpu clean
SMOLLM2 := models/smollm2-135m-instruct

env:
	@bash tools/setup_env.sh

env-sglang:
	@bash tools/setup_sglang_env.sh

demo: env
	$(PY) -m megatron_rence.train recipes/demo_cpu.yaml $(ARGS)

# A real pretrained model (SmolLM2-135M-Instruct) trained on 2 CPU cores, ~18 minutes on 2 idle cores; see the README.
demo-real: env
	$(PY) -c "import gguf, accelerate" 2>/dev/null || $(PY) -m pip install -q -e ".[real]"
	$(PY) tools/prepare_smollm2.py $(SMOLLM2)
	$(PY) -m megatron_rence.train recipes/smollm2_cpu.yaml $(ARGS)

# both tiers: the main one in .venv, then the sglang one in .venv-sglang (tools/run_tests.sh)
test: env
	bash tools/run_tests.sh $(ARGS)

test-main: env
	$(PY) -m pytest -m "not gpu and not sglang" $(ARGS)

test-sglang: env-sglang
	RENCE_SGLANG_TIER=1 .venv-sglang/bin/python -m pytest -m sglang tests/sglang $(ARGS)

# The real-Slurm tier alone (root; installs Debian's Slurm if missing): tests/slurm, also part of `make test`.
test-slurm: env
	$(PY) -m pytest -m slurm tests/slurm $(ARGS)

test-gpu: env
	$(PY) -m pytest -m gpu tests/gpu $(ARGS)

clean:
	rm -rf runs .pytest_cache
