"""Faults on the real processes: SIGKILL the drafter (and time the stall its restart causes), SIGKILL
the verifier, SIGTERM the server."""
from __future__ import annotations

import contextlib
import logging
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
import torch

from cluster.serving.client import OutriderClient
from tests.conftest import AR_NEW, wait_for

ROOT = Path(__file__).parent.parent
log = logging.getLogger(__name__)
NEW = AR_NEW
USERS, RESTART_NEW, MAX_GAP_S = 3, 200, 1.0   # the timed restart: streams, tokens per request, bound
pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny({"metrics.enabled": False})
    yield server, client
    client.close()
    server.stop(grace_s=1)


def _run_streams(client, prompts, results, new: int = NEW):
    def one(i):
        try:
            results[i] = client.generate_ids(prompts[i], max_new_tokens=new, ignore_eos=True)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


def _exact_or_unavailable(results: dict, refs: list, allow_unavailable: bool) -> int:
    """Every stream either completed token-identical to its reference, or (where allowed) ended
    with UNAVAILABLE. A stream that ended OK but short, or with any other status, fails.
    Returns how many completed."""
    assert sorted(results) == list(range(len(results))), f"streams without a result: {sorted(results)}"
    completed = 0
    for i, r in sorted(results.items()):
        if isinstance(r, grpc.RpcError):
            assert allow_unavailable and r.code() == grpc.StatusCode.UNAVAILABLE, \
                f"stream {i} ended with {r.code()}: {r.details()}"
            continue
        ids, final = r
        assert final is not None, f"stream {i} ended OK without a final message after {len(ids)} tokens"
        assert final.finish_reason == "length" and final.usage.completion_tokens == len(ids), \
            f"stream {i} ended OK but {final.finish_reason} after {len(ids)}/{len(refs[i])} tokens"
        assert ids == refs[i], f"stream {i} completed but differs from the reference"
        completed += 1
    return completed


class HealthWatch:
    """Every health status the server announces, in order (grpc.health.v1 Watch, opened before the
    fault, so a transition is seen however briefly it lasts)."""

    def __init__(self, client):
        from grpc_health.v1 import health_pb2

        self._name = health_pb2.HealthCheckResponse.ServingStatus.Name
        self.seen: list[str] = []
        self._call = client.health_stub.Watch(health_pb2.HealthCheckRequest(service=""))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for(lambda: self.seen, 10, "the first health status")

    def _run(self):
        try:
            for resp in self._call:
                self.seen.append(self._name(resp.status))
        except grpc.RpcError:
            pass

    def saw(self, *sequence: str) -> bool:
        """True once `sequence` appeared in order (not necessarily adjacent) after the first status."""
        it = iter(self.seen[1:])
        return all(any(s == want for s in it) for want in sequence)

    def close(self):
        self._call.cancel()
        self._thread.join(5)


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
    wait_for(lambda: server.engine.metrics()["tokens"] > tokens_before + 50, what="streaming")
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(180)
    for i, ref in enumerate(ar_refs):
        ids, final = results[i]  # an RpcError here would fail the test: nothing may be lost
        assert final.finish_reason == "length" and ids == ref, f"stream {i} differs after the drafter died"
    assert _exact_or_unavailable(results, ar_refs, allow_unavailable=False) == len(ar_refs)
    wait_for(lambda: server.supervisor.drafter_restarts >= 1 and server.engine.metrics()["drafter_ok"],
          what="drafter restart")
    assert server.engine.drafter_pid() != old_pid
    _, final = client.generate_ids(held_out_prompts[7], max_new_tokens=64)
    assert final.stats.cache_hits > 0, "speculation did not resume after the restart"


class Timeline:
    """The verifier's drafter_ok flag, sampled every few ms from a thread of the test: when
    speculation stopped after the kill and when it came back (`rejoined`)."""

    def __init__(self, verifier):
        self.verifier = verifier
        self.lost_at = self.back_at = None
        self.rejoined = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            now, ok = time.perf_counter(), self.verifier.drafter_ok
            if self.lost_at is None and not ok:
                self.lost_at = now
            elif self.lost_at is not None and ok:
                self.back_at = now
                self.rejoined.set()
                return

    def close(self):
        self._stop.set()
        self._thread.join(5)


def test_drafter_restart_stalls_no_stream(served_local, ar_refs, held_out_prompts):
    """A drafter restart stalls nobody. Three users stream 200-token greedy requests back to back
    (the tiny pair decodes one in a fraction of a second; the replacement drafter takes seconds to
    start, so one request would end before the join it is meant to measure). The drafter is
    SIGKILLed in the middle of their first requests; each user goes on until a request begun after
    the rejoin has finished. The verifier joins the new drafter in the background
    (actors/drafter_client.py), so the largest gap between two chunks of a stream around the kill
    stays under MAX_GAP_S, the one timed bound of the reliability spec; when the loop joined the
    drafter itself, every stream froze until the new process had started (1.7 s measured)."""
    server, client = served_local
    verifier = server.engine.verifier
    wait_for(lambda: verifier.drafter_ok, what="a drafter on the data plane")
    old_pid, restarts = server.engine.drafter_pid(), server.supervisor.drafter_restarts
    arrivals: dict[int, list[float]] = {u: [] for u in range(USERS)}
    done: list[tuple[int, int, list[int], object, float]] = []   # (user, prompt, tokens, final, start)
    timeline: list[Timeline] = []
    errors: list[BaseException] = []

    def user(u):
        try:
            for n in range(100):   # a bound far above the ~20 a run takes
                prompt, t_start = (u + USERS * n) % len(ar_refs), time.perf_counter()
                ids, final = [], None
                for item in client.generate(held_out_prompts[prompt], max_new_tokens=RESTART_NEW, ignore_eos=True):
                    if item.HasField("chunk"):
                        arrivals[u].append(time.perf_counter())
                        ids += item.chunk.token_ids
                    else:
                        final = item.final
                done.append((u, prompt, ids, final, t_start))
                if timeline and timeline[0].rejoined.is_set() and t_start > timeline[0].back_at:
                    return
        except BaseException as e:  # reported by the test's thread
            errors.append(e)

    threads = [threading.Thread(target=user, args=(u,)) for u in range(USERS)]
    for t in threads:
        t.start()
    wait_for(lambda: all(len(a) >= 5 for a in arrivals.values()), what="every stream under way")
    t_kill = time.perf_counter()
    timeline.append(Timeline(verifier))
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(120)
    tl = timeline[0]
    tl.close()
    assert not errors, f"a stream failed: {errors[0]!r}"

    for u, prompt, ids, final, _ in done:
        assert final is not None and final.finish_reason == "length", f"user {u}: a stream ended without its final"
        assert ids == ar_refs[prompt][:RESTART_NEW], f"user {u}: prompt {prompt} differs from plain AR decoding"
    assert tl.rejoined.is_set(), "the drafter did not rejoin while the users streamed"
    after = [final for u, _, _, final, t_start in done if t_start > tl.back_at]
    assert len(after) == USERS, "every user must finish a request begun after the rejoin"
    assert all(f.stats.cache_hits > 0 for f in after), "speculation did not resume after the restart"
    # Around the kill: from just before it until the new drafter has had a second on the data plane
    # (the swap, the re-admissions, its first drafts); later chunks only measure the machine's load.
    gap, at = max((b - a, a - t_kill) for a_s in arrivals.values() for a, b in zip(a_s, a_s[1:])
                  if t_kill - 0.5 < b < tl.back_at + 1.0)
    log.info("drafter killed: lost after %.3fs, rejoined after %.2fs; %d requests; largest gap between two "
             "chunks of a stream %.3fs, from %.2fs after the kill", tl.lost_at - t_kill, tl.back_at - t_kill,
             len(done), gap, at)
    assert gap < MAX_GAP_S, f"a stream stalled {gap:.2f}s around the drafter restart ({at:.2f}s after the kill)"
    assert server.supervisor.drafter_restarts > restarts and server.engine.drafter_pid() != old_pid


def test_drafter_sigkill_while_sampling(served, tiny_pair, held_out_prompts):
    """The sampling path (q rows posted ahead, rejection sampling) loses its drafter mid-stream:
    every stream still ends with all its tokens, each one inside the target's top-k at its position
    (teacher forcing in transformers), and speculation resumes."""
    from transformers import AutoModelForCausalLM

    server, client = served
    wait_for(lambda: server.engine.metrics()["drafter_ok"], what="a drafter on the data plane")
    top_k, n = 4, 4
    old_pid = server.engine.drafter_pid()
    restarts = server.supervisor.drafter_restarts
    tokens_before = server.engine.metrics()["tokens"]
    results: dict = {}

    def one(i):
        try:
            results[i] = client.generate_ids(held_out_prompts[i], max_new_tokens=NEW, ignore_eos=True,
                                             temperature=0.8, top_k=top_k, seed=100 + i)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    wait_for(lambda: server.engine.metrics()["tokens"] > tokens_before + 50, what="streaming")
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(180)
    hf = AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()
    for i in range(n):
        assert not isinstance(results.get(i), grpc.RpcError), f"stream {i} failed: {results.get(i)}"
        ids, final = results[i]
        assert final.finish_reason == "length" and len(ids) == NEW == final.usage.completion_tokens, \
            f"stream {i}: {final.finish_reason} after {len(ids)} tokens"
        p = list(held_out_prompts[i])
        with torch.inference_mode():
            logits = hf(torch.tensor([p + ids[:-1]])).logits[0, len(p) - 1:]
        kth = logits.topk(top_k).values[:, -1]
        picked = logits.gather(1, torch.tensor(ids)[:, None])[:, 0]
        outside = (picked < kth - 1e-4).nonzero().flatten().tolist()
        assert not outside, f"stream {i}: tokens outside the target's top-{top_k} at positions {outside[:5]}"
    wait_for(lambda: server.supervisor.drafter_restarts > restarts and server.engine.metrics()["drafter_ok"],
          what="drafter restart")
    _, final = client.generate_ids(held_out_prompts[7], max_new_tokens=64, temperature=0.8, top_k=top_k, seed=1)
    assert final.stats.cache_hits > 0, "speculation did not resume after the restart"


def test_verifier_sigkill_fails_fast_then_recovers(served, ar_refs, held_out_prompts):
    server, client = served
    results: dict = {}
    watch = HealthWatch(client)
    assert watch.seen[0] == "SERVING"
    tokens_before = server.engine.metrics()["tokens"]
    threads = _run_streams(client, held_out_prompts[:4], results)
    wait_for(lambda: server.coord.in_flight == 4, what="admission")
    wait_for(lambda: server.engine.metrics()["tokens"] > tokens_before + 8, what="streaming")
    os.kill(server.engine.verifier_pid(), signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(30)
    assert all(not t.is_alive() for t in threads), "a stream hung after the verifier died"
    codes = [r.code() for r in results.values() if isinstance(r, grpc.RpcError)]
    assert codes and all(c == grpc.StatusCode.UNAVAILABLE for c in codes), codes
    # Each stream is exact to the end or UNAVAILABLE: none may end OK with a truncated text.
    _exact_or_unavailable(results, ar_refs[:4], allow_unavailable=True)
    # The transition itself, as announced to a watcher: NOT_SERVING while rebuilding, then SERVING.
    wait_for(lambda: watch.saw("NOT_SERVING", "SERVING"), 30, "NOT_SERVING then SERVING announced")
    watch.close()
    wait_for(lambda: client.health() == "SERVING", 30, "SERVING again")
    assert time.monotonic() - t0 < 30
    assert server.supervisor.verifier_rebuilds == 1
    _, final = client.generate_ids(held_out_prompts[5], max_new_tokens=32)
    assert final.usage.completion_tokens == 32


def _named(procs: list[psutil.Process]) -> dict[str, list[psutil.Process]]:
    """The Ray processes a server brings up, by name: raylet, GCS, and the two actors' workers
    (Ray titles an actor's process `ray::<Class>` / `ray::<Class>.<method>`)."""
    out: dict[str, list[psutil.Process]] = {"raylet": [], "gcs_server": [], "VerifierActor": [], "DrafterActor": []}
    for p in procs:
        try:
            title = " ".join(p.cmdline()) or p.name()
            name = p.name()
        except psutil.Error:
            continue
        for key in ("raylet", "gcs_server"):
            if name == key or os.path.basename(title.split()[0]) == key:
                out[key].append(p)
        for key in ("VerifierActor", "DrafterActor"):
            if title.startswith(f"ray::{key}"):
                out[key].append(p)
    return out


def test_sigterm_drains_and_exits_cleanly(tiny_pair, tmp_path, ar_refs, held_out_prompts):
    """`outrider serve` as a real process: SIGTERM mid-request lets it finish, then exits 0.

    The request is held in flight deterministically: the verifier's process is stopped (SIGSTOP)
    before SIGTERM and continued only once the server is seen draining, so the drain really has a
    request to wait for. Ports are all ephemeral (gRPC and metrics read back from the log)."""
    import yaml

    env = dict(os.environ, RAY_worker_niceness="0")
    cfg = yaml.safe_load((ROOT / "configs" / "local-cpu.yaml").read_text())
    cfg["server"].update(port=0, drain_grace_s=60)
    cfg["metrics"]["port"] = 0
    cfg.setdefault("http", {})["port"] = 0
    cfg["http"] = {"port": 0}
    (config := tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "-c", str(config),
                                 "--port", "0"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    family: list[psutil.Process] = []
    stopped: psutil.Process | None = None
    try:
        port = metrics_port = None

        def listening():
            nonlocal port, metrics_port
            assert proc.poll() is None, log.read_text()[-3000:]
            for line in log.read_text().splitlines():
                if "serving outrider.v1 on" in line:
                    port = int(line.rsplit(":", 1)[1].split()[0])
                if "metrics on http://" in line:
                    metrics_port = int(line.split("metrics on http://", 1)[1].split("/")[0].rsplit(":", 1)[1])
            return port is not None
        wait_for(listening, 180, "server start")
        assert metrics_port and metrics_port != 9464, f"metrics not on an ephemeral port: {metrics_port}"
        import urllib.request
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert "outrider:engine_up" in body
        with OutriderClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(60)
            stream = client.generate(held_out_prompts[0], max_new_tokens=NEW, ignore_eos=True)
            first = next(stream)
            # Everything the server started (raylet, GCS, the two actors) must end with it.
            family = psutil.Process(proc.pid).children(recursive=True)
            assert len(family) >= 3
            named = _named(family)
            assert all(named.values()), f"not all of raylet, GCS and the actors found: {named}"
            (verifier,) = named["VerifierActor"]
            verifier.suspend()
            stopped = verifier
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: client.health() == "NOT_SERVING", 30, "NOT_SERVING after SIGTERM")
            with pytest.raises(grpc.RpcError) as refused:
                client.generate_ids("x = ", max_new_tokens=4)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            verifier.resume()
            stopped = None
            rest = list(stream)
        assert first.HasField("chunk") and rest[-1].HasField("final")
        assert rest[-1].final.finish_reason == "length", "the in-flight request was not drained"
        ids = [t for item in [first, *rest] if item.HasField("chunk") for t in item.chunk.token_ids]
        assert rest[-1].final.usage.completion_tokens == len(ids) == NEW, f"drained with {len(ids)}/{NEW} tokens"
        assert ids == ar_refs[0], "the drained request's tokens differ from the reference"
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if stopped is not None:
            stopped.resume()
        if proc.poll() is None:
            proc.kill()
            for p in family:  # a failed run must not leave its Ray behind
                with contextlib.suppress(psutil.Error):
                    p.kill()
    text = log.read_text()
    assert "server stopped" in text
    _, alive = psutil.wait_procs(family, timeout=20)
    assert not alive, f"orphans left behind: {[p.cmdline()[:2] for p in alive]}"
    for name, procs in named.items():
        left = [p.pid for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"{name} still running after the server exited: {left}"
