# dlm-align developer commands. Each target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dlm-align-installed
# The tested set (constraints.txt) pins every direct dependency and test tool; pyproject.toml only bounds them.
CONSTRAINTS := constraints.txt

.PHONY: setup test lint docs check-install quickstart quickstart-clean quickstart-loops bench clean

# torch first, alone, at the pinned version: the CPU build where the index offers it (an unpinned torch would pull
# a multi-GB CUDA build).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) torch
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install dlm-align with its test tools, at the tested versions

check-install:  ## does installing dlm-align keep an environment's own torch? (a throwaway venv; needs the package index)
	bash bench/check_install.sh

test: setup  ## lint, then the whole test suite (CPU only, no network; tests/test_docs_code.py builds the docs site)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

docs: setup  ## the documentation site into site/ (mkdocs build --strict: a warning fails it; nothing is fetched)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

quickstart: setup  ## the embedded default end to end: base -> SFT -> GRPO, evaluated after each, report in runs/quickstart
	$(BIN)/dlm-align run quickstart

quickstart-clean: setup  ## the same pipeline on clean SFT data (coupled-GRPO), report in runs/quickstart-clean
	$(BIN)/dlm-align run quickstart-clean

quickstart-loops: setup  ## a loop-prone SFT, then GRPO with loop_penalty; loop rate per stage in runs/quickstart-loops
	$(BIN)/dlm-align run quickstart-loops

bench: setup  ## CPU benchmarks (tables printed, JSON in bench/results/)
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/estimators.py
	$(BIN)/python bench/preference.py
	$(BIN)/python bench/grpo_update.py
	$(BIN)/python bench/loops.py
	$(BIN)/python bench/logit_check.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
