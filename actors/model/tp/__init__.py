"""Tensor parallelism for the target: N ranks, each with 1/N of every layer (docs/tensor-parallel.md).

shard.py cuts the model (which tensors split how, per-rank shapes); group.py forms the ranks'
groups and carries rank 0's calls; worker.py is ranks 1..N-1. Rank 0 is the Verifier itself.
"""
