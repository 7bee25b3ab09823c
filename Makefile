# Two entry points for a fresh machine: `make run` (main job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/securefml eval --dataset digits-fewshot --algorithm fomaml --rounds 60 --clients-per-round 8 --dataset-option n_train=40 --protocols ckks --attacks none signflip --malicious 0.25 --defenses mean recommended --seeds 0 --fresh --no-plots --no-progress --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

lint: $(STAMP)
	$(BIN)/ruff check securefml protocols defenses attacks tests benchmarks
	$(BIN)/mypy securefml protocols defenses attacks

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
