# Two entry points for a fresh machine: `make run` (main job) and `make test` (the suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The strict editable install links each module file into build/__editable__.*: a new module needs
# linking again.  LINKS is keyed on the list of module files, so adding one re-links on the next make.
TREE := $(shell find securefml protocols defenses attacks -name '*.py' -o -name py.typed | sort | cksum | cut -d' ' -f1)
LINKS := $(VENV)/.linked-$(TREE)

.PHONY: setup run test lint docs clean

$(STAMP): pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=77" wheel
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# Strict editable mode: a folder of links (build/__editable__.*) that mypy and IDEs follow, with
	# protocols/, defenses/, attacks/ linked in as securefml.protocols, .defenses, .attacks.
	$(BIN)/pip install -q -e ".[dev]" --config-settings editable_mode=strict
	touch $(STAMP)

$(LINKS): $(STAMP)
	rm -f $(VENV)/.linked-*
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $(LINKS)

setup: $(LINKS)

run: $(LINKS)
	$(BIN)/securefml eval --dataset digits-fewshot --algorithm fomaml --rounds 60 --clients-per-round 8 --dataset-option n_train=40 --protocols ckks --attacks none signflip --malicious 0.25 --defenses mean recommended --seeds 0 --fresh --no-plots --no-progress --out results/demo

# The suite includes tests/test_packaging.py: the built wheel in a fresh virtualenv.
test: $(LINKS)
	$(BIN)/python -m pytest -n 2 tests

lint: $(LINKS)
	$(BIN)/ruff check securefml protocols defenses attacks tests benchmarks examples setup.py
	# Checked as the installed package: each file once, under its one module name (securefml.attacks.*,
	# not also attacks.*), through the strict editable install's folder of links.
	MYPYPATH=$$(ls -d build/__editable__.securefml-*) $(BIN)/mypy -p securefml

# The API reference (mkdocs + mkdocstrings, warnings are errors), from a plain install of the package.
docs: $(LINKS)
	$(BIN)/pip install -q -e ".[docs]" --config-settings editable_mode=strict
	rm -rf build/docs-src build/lib
	$(BIN)/pip install -q --no-deps --no-build-isolation --target build/docs-src .
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist results .pytest_cache .hypothesis
