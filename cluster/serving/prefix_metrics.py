"""Prefix-cache metric families (actors/kv/prefix.py), read from the engine's metrics() at scrape
time by cluster/serving/metrics.py's collector: per role (target = the verifier's cache, draft = the
drafter's), as vLLM counts them, in tokens:

  * `prefix_cache_queries`: prompt tokens looked up at admission;
  * `prefix_cache_hits`: of which were found cached (their prefill skipped);
  * `prefix_cache_hit_rate`: hits / queries since start (0 before any query);
  * `prefix_cache_blocks`: KV blocks the cache names, by state: `in_use` (some sequence holds
    them too) or `parked` (no sequence does: reclaimable, evicted least recently used first).
"""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "outrider:"


def _roles(m: dict) -> list[tuple[str, dict]]:
    out = [("target", m)]
    if m.get("drafter"):
        out.append(("draft", m["drafter"]))
    return [(role, x) for role, x in out if "prefix_query_tokens" in x]


def prefix_families(m: dict):
    """The families for one engine's (or several replicas' summed) metrics(); none when prefix
    caching is off."""
    roles = _roles(m)
    if not roles:
        return
    queries = CounterMetricFamily(P + "prefix_cache_queries", "prompt tokens looked up in the prefix cache",
                                  labels=["role"])
    hits = CounterMetricFamily(P + "prefix_cache_hits", "prompt tokens found in the prefix cache (prefill "
                               "skipped)", labels=["role"])
    rate = GaugeMetricFamily(P + "prefix_cache_hit_rate", "prefix cache hits / queries in tokens since start",
                             labels=["role"])
    blocks = GaugeMetricFamily(P + "prefix_cache_blocks", "KV blocks held by the prefix cache: in_use (a "
                               "sequence holds them too) or parked (reclaimable)", labels=["role", "state"])
    for role, x in roles:
        q, h = float(x["prefix_query_tokens"]), float(x["prefix_hit_tokens"])
        queries.add_metric([role], q)
        hits.add_metric([role], h)
        rate.add_metric([role], h / q if q else 0.0)
        parked = float(x.get("prefix_blocks_parked", 0))
        blocks.add_metric([role, "in_use"], float(x.get("prefix_blocks", 0)) - parked)
        blocks.add_metric([role, "parked"], parked)
    yield from (queries, hits, rate, blocks)
