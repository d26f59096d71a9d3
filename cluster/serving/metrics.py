"""Prometheus metrics, named after vLLM's so existing dashboards read them.

Per-request figures (speculation counters, latency histograms) are recorded when a request
finishes. Engine-wide figures (verifier and drafter busy/idle seconds, rounds) are read from the
actors at scrape time by a collector, so a scrape always shows the live totals; with several
engine replicas (cluster.replicas) they are summed over the replicas.

Load gauges, as vLLM names them, per replica (label `replica`) and in total (no label):
`num_requests_running` (per replica: sequences in its verifier's batch; in total: the server's
open streams), `num_requests_waiting` (admitted to a verifier, waiting for a batch slot or KV
blocks) and `kv_cache_usage_perc` (the fraction of the verifier's KV blocks in use, 0..1; parked
prefix-cache blocks are reclaimable, not in use). The router (cluster/serving/router.py) balances
on the same numbers. Prefix-cache figures: cluster/serving/prefix_metrics.py.
"""
from __future__ import annotations

import logging
import time

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.samples import Sample

from actors.spec.stats import SpecStats
from cluster.serving.prefix_metrics import prefix_families

log = logging.getLogger(__name__)
P = "outrider:"
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class InFlight:
    """The server's open streams (gRPC and HTTP): inc() when one starts, dec() when it ends."""

    def __init__(self):
        self._n, self._lock = 0, threading.Lock()

    def inc(self) -> None:
        with self._lock:
            self._n += 1

    def dec(self) -> None:
        with self._lock:
            self._n -= 1

    @property
    def value(self) -> int:
        return self._n


def kv_usage(m: dict) -> float:
    """The fraction of a verifier's KV blocks in use, from its metrics()."""
    return m.get("kv_blocks_used", 0) / m["kv_blocks"] if m.get("kv_blocks") else 0.0


def summed(ms: list[dict]) -> dict:
    """Several replicas' metrics() as one: numbers added, the drafter's too; drafter_ok only if
    every replica's drafter is up."""
    out: dict = {"drafter_ok": all(m.get("drafter_ok") for m in ms)}
    drafters = [m["drafter"] for m in ms if m.get("drafter")]
    for m in ms:
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
    if drafters:
        out["drafter"] = numbers_added(drafters)
    return out


def numbers_added(stats: list[dict]) -> dict:
    """Several drafters' stats() as one: numbers added (the training loss averaged)."""
    d: dict = {}
    for x in stats:
        for k, v in x.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                d[k] = d.get(k, 0) + v
    if "train_loss_ema" in d:
        d["train_loss_ema"] /= len(stats)
    return d


class EngineCollector:
    """Reads every replica's engine.metrics() on scrape (cached for a second: a scrape is one
    Ray call per replica)."""

    def __init__(self, engine_ref, in_flight: InFlight):
        # A callable returning the current engine, or the list of replicas' engines (they may be rebuilt).
        self.engine_ref = engine_ref
        self.in_flight = in_flight
        self._cache: tuple[float, list[dict]] = (0.0, [])

    def _engines(self) -> list:
        if self.engine_ref is None:
            return []
        got = self.engine_ref()
        return list(got) if isinstance(got, (list, tuple)) else [got]

    def _metrics(self) -> list[dict]:
        t, ms = self._cache
        if time.monotonic() - t > 1.0:
            ms = []
            for engine in self._engines():
                try:
                    ms.append(engine.metrics())
                except Exception as e:  # a dead engine must not break the scrape
                    log.debug("engine metrics unavailable: %s", e)
                    ms.append({})
            self._cache = (time.monotonic(), ms)
        return ms

    def collect(self):
        ms = self._metrics()
        yield from self._load(ms)
        if self.engine_ref is None:
            return
        up = GaugeMetricFamily(P + "engine_up", "1 when every engine replica answered the last scrape")
        up.add_metric([], 1.0 if ms and all(ms) else 0.0)
        yield up
        if len(ms) > 1:
            rup = GaugeMetricFamily(P + "replica_up", "1 when the replica's engine answered the last scrape",
                                    labels=["replica"])
            for i, m in enumerate(ms):
                rup.add_metric([str(i)], 1.0 if m else 0.0)
            yield rup
        live = [m for m in ms if m]
        if not live:
            return
        m = live[0] if len(live) == 1 else summed(live)
        seconds = CounterMetricFamily(P + "verifier_seconds", "verifier time by activity", labels=["activity"])
        for key in ("verify_s", "prefill_s", "wait_s", "transport_s", "control_s", "idle_s"):
            seconds.add_metric([key.removesuffix("_s")], float(m.get(key, 0.0)))
        yield seconds
        steps = CounterMetricFamily(P + "verifier_steps", "verifier loop steps")
        steps.add_metric([], float(m.get("steps", 0)))
        yield steps
        d = m.get("drafter") or {}
        if d:
            ds = CounterMetricFamily(P + "drafter_seconds", "drafter time by activity", labels=["activity"])
            for key in ("wait_s", "reply_s", "prespec_s"):
                ds.add_metric([key.removesuffix("_s")], float(d.get(key, 0.0)))
            yield ds
            if "train_steps" in d:  # online learning (speculation.online_learning) is on
                ts = CounterMetricFamily(P + "drafter_train_steps", "optimizer steps the drafter took online")
                ts.add_metric([], float(d["train_steps"]))
                yield ts
                tt = CounterMetricFamily(P + "drafter_train_seconds", "seconds the drafter spent in online "
                                         "training steps, and the part of them a verifier frame waited for",
                                         labels=["part"])
                tt.add_metric(["total"], float(d.get("train_s", 0.0)))
                tt.add_metric(["late"], float(d.get("train_late_s", 0.0)))
                yield tt
                tok = CounterMetricFamily(P + "drafter_train_tokens", "target tokens the online steps trained on")
                tok.add_metric([], float(d.get("train_scored_tokens", 0)))
                yield tok
                loss = GaugeMetricFamily(P + "drafter_train_loss", "online training cross-entropy on the "
                                         "target's tokens (moving average)")
                loss.add_metric([], float(d.get("train_loss_ema", float("nan"))))
                yield loss
                buf = GaugeMetricFamily(P + "drafter_train_buffer_tokens", "tokens in the replay buffer")
                buf.add_metric([], float(d.get("train_buffer_tokens", 0)))
                yield buf
        yield from prefix_families(m)
        ok = GaugeMetricFamily(P + "drafter_up", "1 while the drafter is on the data plane (every replica's)")
        ok.add_metric([], 1.0 if m.get("drafter_ok") else 0.0)
        yield ok

    def _load(self, ms: list[dict]):
        """vLLM's load gauges: one sample per replica that answered, and the total (no label)."""
        running = GaugeMetricFamily(P + "num_requests_running", "requests running: per replica the sequences in "
                                    "its verifier's batch, in total the server's open streams")
        waiting = GaugeMetricFamily(P + "num_requests_waiting", "requests admitted to a verifier and waiting for "
                                    "a batch slot or KV blocks")
        kv = GaugeMetricFamily(P + "kv_cache_usage_perc", "fraction of the verifier's KV cache blocks in use (0..1)")
        running.add_metric([], float(self.in_flight.value))
        live = [(i, m) for i, m in enumerate(ms) if m]
        for i, m in live:
            labels = {"replica": str(i)}
            # One family holds the per-replica samples and the unlabeled total, as the exposition
            # format allows; GaugeMetricFamily.add_metric fixes one label set, so append directly.
            running.samples.append(Sample(running.name, labels, float(m.get("active", 0))))
            waiting.samples.append(Sample(waiting.name, labels, float(m.get("waiting", 0))))
            kv.samples.append(Sample(kv.name, labels, kv_usage(m)))
        if live:
            waiting.add_metric([], float(sum(m.get("waiting", 0) for _, m in live)))
            blocks = sum(m.get("kv_blocks", 0) for _, m in live)
            kv.add_metric([], sum(m.get("kv_blocks_used", 0) for _, m in live) / blocks if blocks else 0.0)
        yield running
        if live:
            yield waiting
            yield kv


class RouteCollector:
    """The router's decisions (cluster/serving/replicas.py): requests per replica and reason. The affinity
    hit rate is reason="affinity" over all requests whose prompt had a remembered prefix."""

    def __init__(self, routes_ref):
        self.routes_ref = routes_ref   # a callable returning {(replica, reason): requests}

    def collect(self):
        routes = CounterMetricFamily(P + "router_requests", "requests routed, by replica and reason (affinity: "
                                     "to the replica that served the prompt's prefix; least_loaded; moved: off a "
                                     "lost replica before streaming)", labels=["replica", "reason"])
        for (replica, reason), n in sorted(dict(self.routes_ref() or {}).items()):
            routes.add_metric([str(replica), reason], float(n))
        yield routes


class Metrics:
    def __init__(self, engine_ref=None, registry: CollectorRegistry | None = None, routes_ref=None):
        r = self.registry = registry or CollectorRegistry()
        self.drafts = Counter(P + "spec_decode_num_drafts", "speculative rounds that verified a draft", registry=r)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "draft tokens proposed", registry=r)
        self.accepted = Counter(P + "spec_decode_num_accepted_tokens", "draft tokens accepted", registry=r)
        self.accepted_pos = Counter(P + "spec_decode_num_accepted_tokens_per_pos", "accepted draft tokens by position",
                                    ["position"], registry=r)
        self.rounds_by_k = Counter(P + "spec_decode_rounds_by_k", "verify rounds by the draft length K they checked "
                                   "(adaptive speculation; K = 0: no draft)", ["k"], registry=r)
        self.hits = Counter(P + "spec_cache_hits", "speculation cache hits", registry=r)
        self.misses = Counter(P + "spec_cache_misses", "speculation cache misses", registry=r)
        self.requests = Counter(P + "request_success", "finished requests", ["finished_reason"], registry=r)
        self.errors = Counter(P + "request_errors", "requests refused or failed", ["code"], registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "tokens generated", registry=r)
        self.latency = Histogram(P + "e2e_request_latency_seconds", "request latency", buckets=_LATENCY, registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "time to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "time per output token after the first",
                              buckets=_TPOT, registry=r)
        self.in_flight = InFlight()
        r.register(EngineCollector(engine_ref, self.in_flight))
        if routes_ref is not None:
            r.register(RouteCollector(routes_ref))
        self._server = None

    def observe_final(self, reason: str, prompt_tokens: int, completion_tokens: int, stats: SpecStats,
                      ttft_s: float, total_s: float) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.drafts.inc(stats.drafts)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted.inc(stats.accepted_tokens)
        for pos, n in enumerate(stats.accepted_per_position):
            if n:
                self.accepted_pos.labels(str(pos)).inc(n)
        for k, n in enumerate(stats.k_histogram):
            if n:
                self.rounds_by_k.labels(str(k)).inc(n)
        self.hits.inc(stats.cache_hits)
        self.misses.inc(stats.cache_misses)
        self.latency.observe(total_s)
        if completion_tokens:
            self.ttft.observe(ttft_s)
        if completion_tokens > 1:
            self.tpot.observe((total_s - ttft_s) / (completion_tokens - 1))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_port
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
