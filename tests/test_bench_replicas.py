"""`outrider bench --concurrency N,... --replicas R,...` (cluster/bench/replicas.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench.replicas import percentile
from cluster.cli import main

ROOT = Path(__file__).parent.parent


def test_percentile_is_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(xs, 0.5) == 3.0 and percentile(xs, 0.99) == 5.0 and percentile(xs, 0.0) == 1.0
    assert percentile([7.0], 0.99) == 7.0
    assert percentile(list(map(float, range(1, 101))), 0.99) == 99.0


def test_replicas_needs_concurrency():
    assert main(["bench", "-c", "configs/local-cpu.yaml", "--replicas", "1,2"]) == 2


# A benchmark (Ray started twice in its own process, ~100 s): routing and exactness are tests/test_replicas.py
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_reports_every_replica_count_and_concurrency(tiny_pair, tmp_path):
    """A served endpoint per replica count (its own process: it starts and shuts down its own Ray)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "-c", "configs/local-cpu.yaml", "--quick",
                          "--concurrency", "1,2", "--replicas", "1,2", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rep = json.loads((tmp_path / "replicas.json").read_text())
    points = [(p["replicas"], p["concurrency"]) for p in rep["points"]]
    assert points == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for p in rep["points"]:
        assert p["tok_s"] > 0 and 0 < p["p50_s"] <= p["p99_s"] and p["requests"] == p["concurrency"]
        assert 0 <= p["cpu_percent"] <= 100 and p["engine_cores"] > 0
    assert "p99 (s)" in out.stdout
