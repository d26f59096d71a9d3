"""The `outrider` command line, run as a user runs it: a subprocess, its stdout and exit code."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(300)


def _outrider(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_generate_ssd_on_the_local_cluster(tiny_pair):
    r = _outrider("generate", "--config", "configs/local-cpu.yaml", "--mode", "ssd", "--max-new-tokens", "24",
                  "--json", "def main():\n    return")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mode"] == "ssd" and out["completion_tokens"] == 24 and out["text"]
    s = out["stats"]
    assert s["drafts"] > 0 and 0 <= s["acceptance_rate"] <= 1 and 0 <= s["hit_rate"] <= 1
    assert "drafter idle" in r.stderr  # where the time went, printed for the user


def test_generate_in_process_sd(tiny_pair):
    r = _outrider("generate", "--target", str(tiny_pair / "target"), "--draft", str(tiny_pair / "draft"),
                  "--mode", "sd", "--k", "3", "--max-new-tokens", "16", "--json", "import os\n")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["completion_tokens"] == 16 and out["stats"]["draft_tokens"] > 0


def test_generate_from_a_server(serve_tiny):
    server, client = serve_tiny({"metrics.enabled": False})
    try:
        r = _outrider("generate", "--server", f"127.0.0.1:{server.port}", "--max-new-tokens", "12", "--json",
                      "class A:\n    def")
        assert r.returncode == 0, r.stderr[-2000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["completion_tokens"] == 12 and out["finish_reason"] == "length"
        bad = _outrider("generate", "--server", f"127.0.0.1:{server.port}", "--max-new-tokens", "0", "x")
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        client.close()
        server.stop(grace_s=1)


@pytest.mark.parametrize("args, words", [
    (["generate", "--config", "configs/nope.yaml", "x"], "cannot read"),
    (["generate", "--config", "configs/local-cpu.yaml", "--k", "0", "--mode", "ssd", "x"], "speculation.k"),
    (["serve", "-c", "configs/local-cpu.yaml", "--port", "70000"], "server.port"),
    (["generate", "--target", "/nonexistent", "x"], "nonexistent"),
])
def test_bad_input_is_one_clear_line(args, words):
    r = _outrider(*args, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert words in r.stderr and "Traceback" not in r.stderr
