"""`cluster.launcher: local`: serving and the bench on plain processes, in a Python that cannot
import Ray at all (a bare GPU machine has none): the verifier runs in the serving process, the
drafter in a spawned child, the data plane is the same gloo channel."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_bench import MODES, _check_report

ROOT = Path(__file__).parent.parent
NO_RAY = "import sys; sys.modules['ray'] = None  # any `import ray` now raises ImportError\n"
pytestmark = pytest.mark.timeout(300)


def _config(tmp_path: Path, **cluster) -> Path:
    cfg = yaml.safe_load((ROOT / "configs/local-cpu.yaml").read_text())
    cfg["cluster"] = {"launcher": "local", **cluster}
    cfg["metrics"]["enabled"] = False
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(code: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-c", NO_RAY + code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_serves_over_grpc_without_ray(tiny_pair, tmp_path):
    out = _run(f"from cluster.demo import main\nsys.exit(main(['-c', {str(_config(tmp_path))!r}, "
               f"'--prompt', 'def parse(text):', '--max-new-tokens', '40']))")
    assert "finish=length tokens=40" in out.stdout, out.stdout
    hits = out.stdout.split("cache hit rate ")[1].split()[0]
    assert float(hits) > 0, out.stdout   # the drafter (a child process) drafted


@pytest.mark.slow   # a bench run (29 s)
def test_bench_runs_without_ray(tiny_pair, tmp_path):
    report = tmp_path / "out"
    out = _run(f"from cluster.bench.run import run_bench\n"
               f"sys.exit(run_bench({str(_config(tmp_path))!r}, {str(report)!r}, quick=True))")
    rep = _check_report(report, out.stdout, MODES)
    assert rep["env"]["launcher"] == "local" and rep["env"]["ray"] is None
    # one engine with a drafter at a time (each holds the process's torch.distributed group)
    spec_phases = [[n for n in p if n.startswith(("sd", "ssd"))] for p in rep["env"]["phases"]]
    assert all(len(p) <= 1 for p in spec_phases) and sum(map(len, spec_phases)) >= 2, rep["env"]["phases"]
    floor = rep["derived"]["memory_floor"]
    assert floor["device"] == "cpu" and floor["floor_ms"] > 0 and floor["copy_gb_per_s"] > 0
    assert "memory floor of a target forward" in (report / "report.md").read_text()
    json.dumps(rep, allow_nan=False)   # plain JSON (no infinity from the unbounded local capacity)


def test_local_launcher_cannot_join_a_ray_cluster(tmp_path):
    from cluster.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"cluster\.address: 'auto' joins a Ray cluster, but launcher: local"):
        load_config(str(_config(tmp_path, address="auto")))
