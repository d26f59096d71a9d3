"""`outrider bench --concurrency N,... --replicas R,... --draft-replicas M,...`: the served
endpoint at scale.

For each replica count R and drafter count M a real server starts (gRPC on a free port,
`cluster.replicas: R`, `models.draft.replicas: M`, the config's models and mode, the embedded Ray
cluster given the CPUs R replicas of M drafters ask for unless the config joins a cluster), and
for each concurrency N, `runs` rounds of N greedy streams of `new` tokens each (EOS ignored,
distinct prompts) go through the gRPC client at once. Reported per point: aggregate tokens/s
(all tokens over the round's wall time, median over rounds), p50 and p99 request latency over
every request of every round, the speculation table's hit rate, the host's CPU use during the
rounds (psutil, 100 % = every core busy) and the cores the engines' own processes (every
replica's verifier and drafters) used on average: the figures that show when a host has no cores
left for another replica.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import statistics
import threading
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


def percentile(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank: with few samples p99 is the slowest request."""
    s = sorted(xs)
    return s[min(len(s), max(1, math.ceil(q * len(s)))) - 1]


def _round(client, prompts: list[list[int]], new: int, hits: list[int] | None = None) -> tuple[float, list[float]]:
    """One round of concurrent streams: its wall time and each request's latency; `hits` gathers
    [table hits, lookups] over its requests."""
    lat: dict[int, float] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            ids, final = client.generate_ids(prompts[i], max_new_tokens=new, ignore_eos=True)
            if final.finish_reason != "length" or len(ids) != new:
                errors.append(f"request {i}: {final.finish_reason}, {len(ids)} tokens")
            if hits is not None:
                hits[0] += final.stats.cache_hits
                hits[1] += final.stats.cache_hits + final.stats.cache_misses
        except Exception as e:  # noqa: BLE001 (reported below, with the others)
            errors.append(f"request {i}: {e}")
        lat[i] = time.perf_counter() - t0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:4]))
    return wall, list(lat.values())


def _engine_procs(server) -> list[psutil.Process]:
    """Every replica's verifier and drafter processes (on this host; others are skipped)."""
    procs = []
    for r in server.coord.replicas:
        e = r.engine
        drafters = [functools.partial(e.drafter_pid, i) for i in range(e.spec.draft_replicas if e.spec.speculative
                                                                          else 0)]
        for pid in (e.verifier_pid, *drafters):
            try:
                procs.append(psutil.Process(pid()))
            except Exception:  # noqa: BLE001 (a process on another node)
                pass
    return procs


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(config: str, replicas: int, concurrency: list[int], new: int, runs: int, drafters: int = 1) -> list[dict]:
    from cluster.models.corpus import prompts as corpus_prompts
    from cluster.serving.client import OutriderClient
    from cluster.config import load_config
    from cluster.launch.deployment import shutdown_ray
    from cluster.serving.server import OutriderServer

    over = {"server.port": 0, "http.enabled": False, "metrics.enabled": False, "engine.max_batch": max(concurrency)}
    base = load_config(config, over)   # one replica: what each of them asks for
    speculative = base.models.draft is not None and base.speculation.mode != "ar"
    if base.cluster.address is None and base.cluster.launcher == "ray":
        m = base.models
        draft = m.draft.num_threads * drafters if speculative else 0
        over["cluster.num_cpus"] = (m.target.tensor_parallel_size * m.target.num_threads + draft) * replicas
    over["cluster.replicas"] = replicas
    if speculative:
        over["models.draft.replicas"] = drafters
    server = OutriderServer(load_config(config, over)).start()
    rows = []
    try:
        client = OutriderClient(f"127.0.0.1:{server.port}")
        client.wait_ready()
        texts = corpus_prompts("code", 8) + corpus_prompts("text", 8)
        ids = [server.tok.encode(t)[-128:] for t in texts]
        _round(client, ids[:replicas], 8)   # warm-up: every replica once
        procs = _engine_procs(server)
        for n in concurrency:
            walls, lats, hits = [], [], [0, 0]
            psutil.cpu_percent()
            cpu0, t0 = _cpu_s(procs), time.perf_counter()
            for r in range(runs):
                wall, lat = _round(client, [ids[(r * n + i) % len(ids)] for i in range(n)], new, hits)
                walls.append(wall)
                lats += lat
            cpu = psutil.cpu_percent()
            engine_cores = (_cpu_s(procs) - cpu0) / (time.perf_counter() - t0)
            row = {"engine_cores": engine_cores, "replicas": replicas, "drafters": drafters, "concurrency": n,
                   "tok_s": statistics.median(n * new / w for w in walls),
                   "hit_rate": hits[0] / hits[1] if hits[1] else None,
                   "p50_s": percentile(lats, 0.5), "p99_s": percentile(lats, 0.99), "cpu_percent": cpu,
                   "cores": psutil.cpu_count(), "requests": len(lats)}
            rows.append(row)
            hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.2f}"
            print(f"{replicas:8d} {drafters:8d} {n:11d} {row['tok_s']:7.1f} {row['p50_s']:7.2f} {row['p99_s']:7.2f} "
                  f"{hit:>8} {cpu:5.0f} % {engine_cores:12.2f}", flush=True)
        client.close()
    finally:
        server.stop(grace_s=1)
        shutdown_ray()
    return rows


def run(config: str, out: str | None, replicas: list[int], concurrency: list[int], new: int = 64,
        runs: int = 2, drafters: list[int] = (1,)) -> int:
    print("replicas drafters concurrency   tok/s  p50 (s) p99 (s) hit rate   host CPU  engine cores", flush=True)
    rows = []
    for r in replicas:
        for m in drafters:
            rows += measure(config, r, concurrency, new, runs, m)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "replicas.json").write_text(json.dumps({"config": config, "new_tokens": new, "runs": runs,
                                                             "points": rows}, indent=1))
    return 0
