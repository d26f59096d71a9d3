"""Drafter and verifier on different Ray nodes, each pinned by its role's custom resources.

The bundle list and the resource checks are plain functions, tested directly. The cluster test
runs Ray's own multi-node harness (ray.cluster_utils.Cluster: one raylet per node on this
machine) in a process of its own (tests/multinode_run.py), so its Ray driver never meets the
embedded Ray other tests share: roles land on the nodes their resources name, greedy output over
gRPC equals plain decoding token for token with speculation hitting, the server keeps serving
exactly when the drafter's node goes away, and hits return once a node with the drafter's
resources joins.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from actors.generate import generate_ar
from actors.model.loader import load_model
from actors.engine_spec import EngineSpec
from actors.spec.stopping import StopCriteria
from cluster.launch.ray_actors import interface_with
from cluster.launch.placement import drafter_bundle, missing_resources, placement_bundles

ROOT = Path(__file__).parent.parent
NEW, LONG = 48, 600
RUN_TIMEOUT_S = 240


def test_bundles_are_target_ranks_then_the_drafter():
    spec = EngineSpec(target="t", draft="d", target_device="cuda", draft_device="cuda", tensor_parallel_size=4,
                      num_threads=2, target_resources={"verifier_host": 1}, draft_resources={"drafter_host": 1})
    bundles = placement_bundles(spec)
    assert bundles == [{"CPU": 2, "GPU": 1, "verifier_host": 1}] * 4 + [{"CPU": 1, "GPU": 1, "drafter_host": 1}]
    assert drafter_bundle(spec) == 4
    # every rank claims its own unit: the target's node must declare 4
    assert missing_resources(bundles, {"CPU": 16, "GPU": 8, "verifier_host": 3, "drafter_host": 1}) == \
        {"verifier_host": 4}
    assert missing_resources(bundles, {"CPU": 16, "GPU": 8, "verifier_host": 4, "drafter_host": 1}) == {}
    ar = EngineSpec(target="t", mode="ar", target_resources={"verifier_host": 0.5})
    assert placement_bundles(ar) == [{"CPU": 1, "verifier_host": 0.5}]


def test_interface_with_finds_the_interface_holding_an_address():
    """gloo is pointed at the interface carrying the node's Ray address (cluster/launch/engine.py)."""
    found = 0
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET:
                assert interface_with(a.address) is not None
                found += 1
    assert found, "no IPv4 interface on this machine"
    assert interface_with("127.0.0.1") is not None
    assert interface_with("203.0.113.77") is None   # TEST-NET-3: held by no interface here


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_roles_on_their_nodes_and_a_lost_drafter_node(tiny_pair, held_out_prompts, tmp_path):
    from tests.test_deploy import _end_session

    prompts = held_out_prompts[:2]
    args = {"target": str(tiny_pair / "target"), "draft": str(tiny_pair / "draft"), "prompts": prompts,
            "new": NEW, "long": LONG, "out": str(tmp_path / "seen.json")}
    (tmp_path / "args.json").write_text(json.dumps(args))
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        # PYTHONPATH: this checkout's modules in the run and in every Ray worker its raylets start
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        run = subprocess.Popen([sys.executable, "-m", "tests.multinode_run", str(tmp_path / "args.json")],
                               cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _end_session(run)   # the run's raylets, workers and GCS too, should it have hung
    tail = log.read_text()[-6000:]
    assert run.returncode == 0, f"multinode run exited {run.returncode}:\n{tail}"
    seen = json.loads(Path(args["out"]).read_text())

    target = load_model(tiny_pair / "target")
    refs = [generate_ar(target, p, StopCriteria(NEW)).tokens for p in prompts]
    long_ref = generate_ar(target, prompts[0], StopCriteria(LONG)).tokens

    # each role on the node its resources name, the two apart; their links go to the verifier's node address
    assert seen["placed"] == seen["nodes"] and seen["placed"]["verifier"] != seen["placed"]["drafter"], seen
    assert seen["rendezvous"] == "127.0.0.2" and seen["events_peer"] == "127.0.0.2", seen
    assert [r["tokens"] for r in seen["with_drafter"]] == refs
    assert sum(r["hits"] for r in seen["with_drafter"]) > 0, "no speculation hits with the drafter up"

    # the drafter's node gone: the long stream it was serving and new requests stay exact, on plain decoding
    assert seen["in_flight"]["tokens"] == long_ref, "the stream in flight when the drafter's node went differs"
    assert [r["tokens"] for r in seen["without_drafter"]] == refs
    assert all(r["hits"] == 0 for r in seen["without_drafter"]), seen["without_drafter"]
    # the replacement waits for a node while the supervisor keeps checking (it is not blocked on it)
    assert seen["drafter_waits"] and seen["supervisor_checks"] >= 3, seen

    # a node with the drafter's resources joins: the bundle moves there and hits resume
    assert seen["resume_s"] < 60, seen
    assert seen["placed_again"] == {"verifier": seen["nodes"]["verifier"], "drafter": seen["replacement_node"]}
    assert [r["tokens"] for r in seen["back"]] == refs
    print(f"startup {seen['startup_s']:.1f}s, lost drafter noticed in {seen['noticed_s']:.1f}s, hits back "
          f"{seen['resume_s']:.1f}s after add_node, stream outlived the node: {seen['in_flight_outlived_node']}, "
          f"whole run {seen['total_s']:.1f}s")
