# Two commands a newcomer needs: `make run` (main job on a built-in default) and `make test`.
# Each creates the virtual environment and installs what is missing.
# `make run` installs only what the main job needs (kvsim and its dependencies); `make test` adds the
# test extras (pytest, hypothesis, Ray, pyarrow). Each install has its own stamp.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: setup run test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

setup: $(TEST_STAMP)

# The main job: Llama-3-8B on one H100 SXM serving the real Azure 2023 conversation trace (read in
# place from ../shared/data); without that folder, the same deployment on the repo's own fixture.
# --force: out/ is this target's own folder, replaced by every `make run`.
run: $(RUN_STAMP)
	$(BIN)/kvsim memory --model llama-3-8b --hardware h100-sxm --context 8192 --batch 32
	@if $(BIN)/python -c "import sys; from kvsim.serve.traces import shared_traces_dir; sys.exit(shared_traces_dir() is None)"; \
	then $(BIN)/kvsim run examples/azure-conv.yaml --out out/azure-conv --force; \
	else echo "(../shared/data not found: running the fixture scenario instead)"; \
	     $(BIN)/kvsim run examples/fixture-sessions.yaml --out out/fixture-sessions --force; fi

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

bench: $(RUN_STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info
