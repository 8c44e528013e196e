# Two commands on a fresh clone: `make run` (the main job, CPU preset) and `make test`.
# Each sets up .venv first (scripts/setup_env.sh is idempotent: a no-op when nothing changed).
SHELL := bash
PY := .venv/bin/python
export AFTRAY_CACHE_DIR ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-slow
setup:
	@bash scripts/setup_env.sh

run: setup  ## the main job on the CPU preset (override keys: make run ARGS="loop.rounds=3")
	$(PY) jobs/aft_gsm8k.py $(ARGS)

test: setup  ## the fast suite (unit + integration on local Ray)
	$(PY) -m pytest -m "not slow and not gpu" -q $(ARGS)

test-slow: setup  ## end-to-end tests (minutes); CI runs them too
	$(PY) -m pytest -m "slow and not gpu" -q --durations=0 $(ARGS)
