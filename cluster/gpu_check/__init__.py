"""The prepared GPU check: `python -m cluster.gpu_check` (or `make gpu-check`), docs/gpu-check.md.

One run on a GPU machine answers whether the engine is right and fast there: greedy identity of
AR, SD and SSD against transformers on the same weights, a sampling chi-square, forward times
against the HBM floor, the CUDA-graph path's capture time and speed-up, peak memory against the
memory plan, both roles on one GPU over the local launcher. Models are built here from a seed at
real shapes (seeded.py); nothing is downloaded.

It needs torch, transformers and safetensors only: it runs the engine's in-process path
(actors/launch.py's LocalEngine) and never imports Ray, grpcio or pydantic, so every import
below is of actors/ or of cluster/ modules that import none of them (tests/test_gpu_check.py
runs the CPU form with those packages blocked).
"""
