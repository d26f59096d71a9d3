"""Serve the tiny pair as two engine replicas on a three-node Ray cluster on this machine.

Run by tests/test_replicas.py in a process of its own (its Ray driver must not meet the embedded
Ray of other tests): `python -m tests.replicas_run ARGS.json`. ARGS names the pair, the prompts
and where to write what was seen (a JSON file); the test makes the assertions.

ray.cluster_utils.Cluster starts a head with no CPUs (the serving process runs beside it) and two
nodes of two CPUs each at loopback addresses of their own (127.0.0.2, 127.0.0.3). A replica is a
verifier and a drafter (one CPU each) in one placement group, so each node holds one replica.
Three phases: eight clients at once (exactness, both replicas busy, the load gauges), prompts
sharing prefixes one after another (affinity), and one replica's verifier killed while eight
clients run (nothing that had not streamed is lost; the replica comes back).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families
from ray.cluster_utils import Cluster

from cluster.serving.client import OutriderClient
from cluster.config import parse_config
from cluster.launch.engine import embedded_ray_env
from cluster.serving.server import OutriderServer
from tests.cluster_run import main, stop, wait

log = logging.getLogger("replicas")
NODE_IPS = ("127.0.0.2", "127.0.0.3")


def config(args: dict, address: str):
    return parse_config({
        "cluster": {"address": address, "replicas": 2},
        "models": {"target": {"path": args["target"]}, "draft": {"path": args["draft"]}},
        "speculation": {"mode": "ssd", "k": 4, "adaptive": False, "fan_out_budget": 12},
        # two sequences per batch: of four requests at a replica, two wait (they have not streamed)
        "engine": {"max_batch": 2, "max_seq_len": 1024, "data_plane_timeout_s": 10},
        "server": {"port": 0}, "http": {"enabled": False}, "metrics": {"port": 0},
    }, "replicas")


def one(client, prompt, new, rid) -> dict:
    """A streamed request: its tokens, and the gRPC error it ended with (None: finished)."""
    out = {"id": rid, "tokens": [], "code": None}
    try:
        for item in client.generate(prompt, max_new_tokens=new, ignore_eos=True, request_id=rid):
            out["tokens"] += list(item.chunk.token_ids)
    except grpc.RpcError as e:
        out["code"] = e.code().name
    return out


def concurrently(client, prompts, new, tag) -> list[dict]:
    res: dict = {}
    threads = [threading.Thread(target=lambda i=i, p=p: res.update({i: one(client, p, new, f"{tag}-{i}")}))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return [res.get(i, {"id": f"{tag}-{i}", "tokens": [], "code": "HUNG"}) for i in range(len(prompts))]


def gauges(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f"{s.name}{{{s.labels.get('replica', '')}}}": s.value for fam in text_string_to_metric_families(body)
            if fam.name in ("outrider:kv_cache_usage_perc", "outrider:num_requests_running",
                            "outrider:num_requests_waiting") for s in fam.samples}


def placed(server) -> dict:
    return {rid: (i, why) for rid, i, why in server.coord.history}


def run(args: dict, seen: dict) -> None:
    embedded_ray_env()
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    server = None
    try:
        nodes = [cluster.add_node(num_cpus=2, node_ip_address=ip) for ip in NODE_IPS]
        seen["nodes"] = [n.node_id for n in nodes]
        server = OutriderServer(config(args, cluster.address)).start()
        seen["startup_s"] = time.monotonic() - t0
        reps = server.coord.replicas
        seen["replica_nodes"] = [r.engine.node_ids() for r in reps]
        client = OutriderClient(f"127.0.0.1:{server.port}")
        client.wait_ready(60)

        # 1. eight clients at once
        t1 = time.monotonic()
        seen["c8"] = concurrently(client, args["prompts"], args["new"], "c8")
        seen["c8_s"] = time.monotonic() - t1
        seen["c8_placed"] = [placed(server)[r["id"]][0] for r in seen["c8"]]

        # the load gauges while eight long streams run (cancelled once both replicas show KV in use)
        peak: dict = {}
        streams = [client.generate(p, max_new_tokens=900, ignore_eos=True) for p in args["prompts"]]

        def loaded() -> bool:   # the gRPC calls start at once; two of each replica's four wait for a slot
            for k, v in gauges(server.metrics_port).items():
                peak[k] = max(peak.get(k, 0.0), v)
            return (all(peak.get(f"outrider:kv_cache_usage_perc{{{r}}}", 0) > 0 for r in ("0", "1"))
                    and peak.get("outrider:num_requests_waiting{}", 0) >= 1)
        wait(loaded, 60, "both replicas' KV use above 0 and requests waiting in /metrics")
        for s in streams:
            s.cancel()
        wait(lambda: server.coord.in_flight == 0, 30, "the cancelled streams freed")
        seen["gauges_peak"] = peak

        # 2. prompts sharing a prefix, one after another, two families interleaved (from idle
        # replicas: the first of each family then goes to a different one)
        wait(lambda: all(r.kv_usage == 0 and r.coord.in_flight == 0 for r in reps), 30, "idle replicas")
        seen["prefix"] = []
        for j, p in enumerate(args["prefix_prompts"]):
            r = one(client, p, 8, f"px-{j}")
            r["replica"], r["reason"] = placed(server)[r["id"]]
            seen["prefix"].append(r)

        # 3. kill replica 0's verifier while eight clients run: some of its requests streaming,
        # some waiting for a batch slot
        victim = reps[0]
        sup = victim.supervisor
        rebuilds, pid = sup.verifier_rebuilds, victim.engine.verifier_pid()
        res: list = []
        loader = threading.Thread(
            target=lambda: res.extend(concurrently(client, args["prompts"], args["long"], "kill")))
        loader.start()

        def mixed() -> bool:
            hs = list(victim.coord.handles.values())
            return any(h.sent for h in hs) and any(not h.sent for h in hs)
        wait(mixed, 60, "replica 0 holding a streaming and a waiting request")
        on_victim = {h.request_id: h.sent for h in victim.coord.handles.values()}
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        health = []
        while loader.is_alive() and time.monotonic() - killed < 120:
            health.append(client.health())
            time.sleep(0.2)
        loader.join(60)
        seen["kill"] = res
        seen["on_victim"] = on_victim
        seen["health_during"] = sorted(set(health))
        seen["moved"] = server.coord.moved
        seen["rebuilt_s"] = wait(lambda: sup.verifier_rebuilds > rebuilds and victim.up, 120, "replica 0 rebuilt")
        seen["kill_placed"] = {r["id"]: placed(server).get(r["id"]) for r in res}

        # the rebuilt replica serves again: two new prompts at once, one on each replica
        seen["after"] = concurrently(client, args["after_prompts"], args["after"], "after")
        seen["after_placed"] = [placed(server)[r["id"]][0] for r in seen["after"]]
        seen["decisions"] = {f"{i}:{why}": n for (i, why), n in server.coord.decisions.items()}
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        seen["router_metric"] = {f"{s.labels['replica']}:{s.labels['reason']}": s.value
                                 for fam in text_string_to_metric_families(body)
                                 if fam.name == "outrider:router_requests" for s in fam.samples}
        seen["total_s"] = time.monotonic() - t0
        client.close()
    finally:
        stop(server, cluster)


if __name__ == "__main__":
    sys.exit(main(run, "replicas"))
