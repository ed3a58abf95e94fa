# dlm-align developer commands. Each target creates .venv and installs the project when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dlm-align-installed
# CPU build of torch (pinned; an unpinned torch would pull a multi-GB CUDA build).
TORCH  := torch==2.13.0

.PHONY: setup test lint quickstart quickstart-clean quickstart-loops bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install dlm-align with its test tools

test: setup  ## lint, then the whole test suite (CPU only, no network)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

quickstart: setup  ## the embedded default end to end: base -> SFT -> GRPO, evaluated after each, report in runs/quickstart
	$(BIN)/dlm-align run quickstart

quickstart-clean: setup  ## the same pipeline on clean SFT data (coupled-GRPO), report in runs/quickstart-clean
	$(BIN)/dlm-align run quickstart-clean

quickstart-loops: setup  ## a loop-prone SFT, then GRPO with loop_penalty; loop rate per stage in runs/quickstart-loops
	$(BIN)/dlm-align run quickstart-loops

bench: setup  ## CPU benchmarks (tables printed, JSON in bench/results/)
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/estimators.py
	$(BIN)/python bench/grpo_update.py
	$(BIN)/python bench/loops.py

clean:
	rm -rf runs .pytest_cache .ruff_cache
