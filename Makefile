# The two Quickstart commands: `make demo` (the CPU demo run) and `make test` (the test suite).
# Both create .venv on first use (tools/setup_env.sh); nothing else needs installing by hand.
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: env demo test test-all test-gpu clean

env:
	@bash tools/setup_env.sh

demo: env
	$(PY) -m megatron_rence.train recipes/demo_cpu.yaml $(ARGS)

test: env
	$(PY) -m pytest -m "not gpu" $(ARGS)

test-gpu: env
	$(PY) -m pytest -m gpu tests/gpu $(ARGS)

clean:
	rm -rf runs .pytest_cache
