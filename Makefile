# Two commands a newcomer needs: `make run` (main job on a built-in default) and `make test`.
# Each creates the virtual environment and installs what is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: Llama-3-8B on one H100 SXM serving the real Azure 2023 conversation trace (read in
# place from ../shared/data); without that folder, the same deployment on the repo's own fixture.
run: $(STAMP)
	$(BIN)/kvsim memory --model llama-3-8b --hardware h100-sxm --context 8192 --batch 32
	@if $(BIN)/python -c "import sys; from kvsim.serve.traces import shared_traces_dir; sys.exit(shared_traces_dir() is None)"; \
	then $(BIN)/kvsim run examples/azure-conv.yaml --out out/azure-conv; \
	else echo "(../shared/data not found: running the fixture scenario instead)"; \
	     $(BIN)/kvsim run examples/fixture-sessions.yaml --out out/fixture-sessions; fi

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info
