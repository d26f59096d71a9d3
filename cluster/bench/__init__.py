"""Benchmarks, each a module run by `outrider bench` (cluster/cli.py) or as `python -m cluster.bench.<name>`.

run.py is `outrider bench` itself: the modes of modes.py side by side, engines kept quiet by
quiet.py, reported by report.py (plot.py draws it); kernels.py and dtype.py time the forward and
the dtypes in the same run. explore, compile, paged and replicas are the bench's other flags;
adaptive, forward, online and verify are A/Bs of their own.
"""
