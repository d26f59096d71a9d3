"""Faults on the real processes: SIGKILL the drafter, SIGKILL the verifier, SIGTERM the server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from actors.generate import generate_ar
from actors.loader import load_model
from actors.stopping import StopCriteria
from cluster.client import OutriderClient

ROOT = Path(__file__).parent.parent
NEW = 300
pytestmark = pytest.mark.timeout(600)


def _wait(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny({"metrics.enabled": False})
    yield server, client
    client.close()
    server.stop(grace_s=1)


@pytest.fixture(scope="module")
def ar_refs(tiny_pair, held_out_prompts):
    """Our own in-process AR (itself checked against transformers in test_generate_hf)."""
    target = load_model(tiny_pair / "target")
    return [generate_ar(target, p, StopCriteria(NEW)).tokens for p in held_out_prompts[:6]]


def _run_streams(client, prompts, results):
    def one(i):
        try:
            results[i] = client.generate_ids(prompts[i], max_new_tokens=NEW, ignore_eos=True)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


@pytest.fixture(scope="module")
def served_local(serve_tiny):
    """The same server on plain processes (cluster.launcher: local): the verifier in this process."""
    server, client = serve_tiny({"metrics.enabled": False, "cluster.launcher": "local"})
    yield server, client
    client.close()
    server.stop(grace_s=1)


@pytest.mark.parametrize("launcher", ["ray", "local"])
def test_drafter_sigkill_keeps_streams_exact_and_speculation_resumes(launcher, request, ar_refs, held_out_prompts):
    server, client = request.getfixturevalue("served" if launcher == "ray" else "served_local")
    old_pid = server.engine.drafter_pid()
    tokens_before = server.engine.metrics()["tokens"]
    results: dict = {}
    threads = _run_streams(client, held_out_prompts[:6], results)
    _wait(lambda: server.engine.metrics()["tokens"] > tokens_before + 50, what="streaming")
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(180)
    for i, ref in enumerate(ar_refs):
        ids, final = results[i]  # an RpcError here would fail the test: nothing may be lost
        assert final.finish_reason == "length" and ids == ref, f"stream {i} differs after the drafter died"
    _wait(lambda: server.supervisor.drafter_restarts >= 1 and server.engine.metrics()["drafter_ok"],
          what="drafter restart")
    assert server.engine.drafter_pid() != old_pid
    _, final = client.generate_ids(held_out_prompts[7], max_new_tokens=64)
    assert final.stats.cache_hits > 0, "speculation did not resume after the restart"


def test_verifier_sigkill_fails_fast_then_recovers(served, held_out_prompts):
    server, client = served
    results: dict = {}
    threads = _run_streams(client, held_out_prompts[:4], results)
    _wait(lambda: server.coord.in_flight == 4, what="admission")
    os.kill(server.engine.verifier_pid(), signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(30)
    assert all(not t.is_alive() for t in threads), "a stream hung after the verifier died"
    codes = [r.code() for r in results.values() if isinstance(r, grpc.RpcError)]
    assert codes and all(c == grpc.StatusCode.UNAVAILABLE for c in codes), codes
    _wait(lambda: client.health() == "NOT_SERVING" or server.supervisor.verifier_rebuilds, 10, "NOT_SERVING")
    _wait(lambda: client.health() == "SERVING", 30, "SERVING again")
    assert time.monotonic() - t0 < 30
    assert server.supervisor.verifier_rebuilds == 1
    _, final = client.generate_ids(held_out_prompts[5], max_new_tokens=32)
    assert final.usage.completion_tokens == 32


def test_sigterm_drains_and_exits_cleanly(tiny_pair, tmp_path):
    """`outrider serve` as a real process: SIGTERM mid-request lets it finish, then exits 0."""
    env = dict(os.environ, RAY_worker_niceness="0")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "-c", "configs/local-cpu.yaml",
                                 "--port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        port = None

        def listening():
            nonlocal port
            assert proc.poll() is None, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                if "serving outrider.v1 on" in line:
                    port = int(line.rsplit(":", 1)[1].split()[0])
            return port is not None
        _wait(listening, 180, "server start")
        with OutriderClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(60)
            stream = client.generate("def main():\n    return", max_new_tokens=200, ignore_eos=True)
            first = next(stream)
            # Everything the server started (raylet, GCS, the two actors) must end with it.
            family = psutil.Process(proc.pid).children(recursive=True)
            assert len(family) >= 3
            proc.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert first.HasField("chunk") and rest[-1].HasField("final")
        assert rest[-1].final.finish_reason == "length", "the in-flight request was not drained"
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "server stopped" in text
    _, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f"orphans left behind: {[p.cmdline()[:2] for p in alive]}"
