"""Serve the tiny pair on a three-node Ray cluster on this machine and lose the drafter's node.

Run by tests/test_multinode.py in a process of its own (its Ray driver must not meet the embedded
Ray of other tests): `python -m tests.multinode_run ARGS.json`. ARGS names the pair, the prompt
token ids, the tokens to generate and where to write what was seen (a JSON file); the test makes
the assertions.

ray.cluster_utils.Cluster starts one raylet per node: a head with no CPUs (the serving process,
the Ray driver, runs beside it), a node declaring {CPU: 2, verifier_host: 1} and one declaring
{CPU: 1, drafter_host: 1}. The verifier's node has room for the drafter too, so PACK (the
default) would put both there: only the per-role resources keep them apart. The nodes take
loopback addresses of their own (127.0.0.2, 127.0.0.3; Linux routes all of 127/8), so the
drafter's rendezvous and the serving process's event stream really go to another node's
address, not to 127.0.0.1 or the head's.
"""
from __future__ import annotations

import logging
import sys
import threading
import time

from ray.cluster_utils import Cluster

from cluster.serving.client import OutriderClient
from cluster.config import parse_config
from cluster.launch.engine import embedded_ray_env
from cluster.serving.server import OutriderServer
from tests import cluster_run
from tests.cluster_run import main, stop

log = logging.getLogger("multinode")
VERIFIER_IP, DRAFTER_IP, REPLACEMENT_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def wait(cond, timeout_s: float, what: str) -> float:
    return cluster_run.wait(cond, timeout_s, what, poll_s=0.1)


def generate(client, prompts, new) -> list[dict]:
    out = []
    for p in prompts:
        ids, final = client.generate_ids(p, max_new_tokens=new, ignore_eos=True)
        out.append({"tokens": ids, "hits": final.stats.cache_hits})
    return out


def config(args: dict, address: str):
    return parse_config({
        "cluster": {"address": address},   # PACK (the default): only the resources keep the roles apart
        "models": {"target": {"path": args["target"], "resources": {"verifier_host": 1}},
                   "draft": {"path": args["draft"], "resources": {"drafter_host": 1}}},
        "speculation": {"mode": "ssd", "k": 4, "adaptive": False, "fan_out_budget": 12},
        "engine": {"max_batch": 4, "max_seq_len": 1024, "data_plane_timeout_s": 10},
        "server": {"port": 0}, "http": {"enabled": False}, "metrics": {"enabled": False},
    }, "multinode")


def run(args: dict, seen: dict) -> None:
    embedded_ray_env()   # workers at normal niceness: the raylets below inherit it
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    server = None
    try:
        vnode = cluster.add_node(num_cpus=2, resources={"verifier_host": 1}, node_ip_address=VERIFIER_IP)
        dnode = cluster.add_node(num_cpus=1, resources={"drafter_host": 1}, node_ip_address=DRAFTER_IP)
        seen["nodes"] = {"verifier": vnode.node_id, "drafter": dnode.node_id}
        server = OutriderServer(config(args, cluster.address)).start()
        engine, sup = server.engine, server.supervisor
        seen["startup_s"] = time.monotonic() - t0
        client = OutriderClient(f"127.0.0.1:{server.port}")
        client.wait_ready(60)
        seen["placed"] = engine.node_ids()
        seen["rendezvous"] = engine.rendezvous[0]
        seen["events_peer"] = engine.events._sock.getpeername()[0]
        seen["with_drafter"] = generate(client, args["prompts"], args["new"])

        # Lose the drafter's node in the middle of a long stream, then serve whole requests without it.
        t1, tokens = time.monotonic(), engine.metrics()["tokens"]
        in_flight = threading.Thread(target=lambda: seen.update(
            in_flight=generate(client, args["prompts"][:1], args["long"])[0], in_flight_end=time.monotonic()))
        in_flight.start()
        wait(lambda: engine.metrics()["tokens"] > tokens + 50, 30, "the long stream streaming")
        cluster.remove_node(dnode)
        removed = time.monotonic()
        in_flight.join(60)
        seen["in_flight_outlived_node"] = seen.get("in_flight_end", 0) > removed
        seen["noticed_s"] = wait(lambda: sup.drafter_restarts >= 1 and not engine.metrics()["drafter_ok"], 60,
                                 "the verifier and the supervisor notice the lost drafter")
        checks = sup.checks
        seen["without_drafter"] = generate(client, args["prompts"], args["new"])
        wait(lambda: sup.checks >= checks + 3, 10, "the supervisor keeps checking")
        seen["supervisor_checks"] = sup.checks - checks
        seen["drafter_waits"] = engine.drafters[0].run is None and sup.drafter_restarts == 1
        seen["without_drafter_s"] = time.monotonic() - t1

        t2 = time.monotonic()
        new = cluster.add_node(num_cpus=1, resources={"drafter_host": 1}, node_ip_address=REPLACEMENT_IP)
        seen["replacement_node"] = new.node_id
        short = args["prompts"][0]

        def hits() -> bool:
            ids, final = client.generate_ids(short, max_new_tokens=16, ignore_eos=True)
            return final.stats.cache_hits > 0

        seen["resume_s"] = wait(hits, 90, "speculation hits after the drafter's node came back")
        seen["back"] = generate(client, args["prompts"], args["new"])
        seen["placed_again"] = engine.node_ids()
        seen["total_s"] = time.monotonic() - t0
        log.info("after add_node: hits in %.1fs", time.monotonic() - t2)
        client.close()
    finally:
        stop(server, cluster)


if __name__ == "__main__":
    sys.exit(main(run, "multinode"))
