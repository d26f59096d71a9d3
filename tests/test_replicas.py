"""Two engine replicas behind one endpoint on a simulated two-node Ray cluster.

One run of tests/replicas_run.py (a process of its own, like tests/test_multinode.py: its Ray
driver must not meet the embedded Ray of other tests) serves the tiny pair as `replicas: 2`, one
replica per node; the tests below read what it saw and compare with plain decoding.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.generate import generate_ar
from actors.model.loader import load_model
from actors.spec.stopping import StopCriteria

ROOT = Path(__file__).parent.parent
NEW, LONG, AFTER = 160, 64, 24   # NEW: long enough for several scrapes of the gauges
RUN_TIMEOUT_S = 300
pytestmark = pytest.mark.timeout(RUN_TIMEOUT_S + 120)


@pytest.fixture(scope="module")
def run(tiny_pair, held_out_prompts, tmp_path_factory):
    from tests.test_deploy import _end_session

    tmp = tmp_path_factory.mktemp("replicas")
    prompts = held_out_prompts[:8]
    a, b = held_out_prompts[8], held_out_prompts[9]
    tails = [p[-16:] for p in held_out_prompts[10:13]]
    # two families sharing 64 tokens each, interleaved: a1 b1 a2 b2 a3 b3
    prefix_prompts = [fam[:64] + t for t in tails for fam in (a, b)]
    args = {"target": str(tiny_pair / "target"), "draft": str(tiny_pair / "draft"), "prompts": prompts,
            "prefix_prompts": prefix_prompts, "after_prompts": held_out_prompts[13:15], "new": NEW, "long": LONG,
            "after": AFTER, "out": str(tmp / "seen.json")}
    (tmp / "args.json").write_text(json.dumps(args))
    log = tmp / "run.log"
    with open(log, "w") as f:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-m", "tests.replicas_run", str(tmp / "args.json")], cwd=ROOT,
                                env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _end_session(proc)
    tail = log.read_text()[-6000:]
    assert proc.returncode == 0, f"replicas run exited {proc.returncode}:\n{tail}"
    seen = json.loads(Path(args["out"]).read_text())
    target = load_model(tiny_pair / "target")
    refs = [generate_ar(target, p, StopCriteria(max(NEW, LONG))).tokens for p in prompts]
    prefix_refs = [generate_ar(target, p, StopCriteria(8)).tokens for p in prefix_prompts]
    after_refs = [generate_ar(target, p, StopCriteria(AFTER)).tokens for p in args["after_prompts"]]
    print(f"startup {seen['startup_s']:.1f}s, concurrency 8 in {seen['c8_s']:.1f}s, replica rebuilt "
          f"{seen['rebuilt_s']:.1f}s after the kill was noticed, {seen['moved']} requests moved, "
          f"decisions {seen['decisions']}, whole run {seen['total_s']:.1f}s")
    return seen, refs, prefix_refs, after_refs


def test_concurrency_8_on_two_replicas_equals_plain_decoding(run):
    seen, refs, _, _ = run
    # one replica per node: each node holds a verifier and its drafter
    nodes = [set(r.values()) for r in seen["replica_nodes"]]
    assert all(len(n) == 1 for n in nodes) and nodes[0] != nodes[1], seen["replica_nodes"]
    assert [r["code"] for r in seen["c8"]] == [None] * 8
    assert [r["tokens"] for r in seen["c8"]] == [ref[:NEW] for ref in refs]
    assert sorted(set(seen["c8_placed"])) == [0, 1], seen["c8_placed"]   # both replicas served
    # the load gauges saw both replicas' KV in use, and the total
    peak = seen["gauges_peak"]
    for replica in ("0", "1", ""):
        assert 0 < peak[f"outrider:kv_cache_usage_perc{{{replica}}}"] <= 1, peak
    assert peak["outrider:num_requests_running{}"] >= 2 and peak["outrider:num_requests_running{0}"] >= 1, peak
    assert peak["outrider:num_requests_waiting{}"] >= 1, peak   # 8 requests, 2 batch slots per replica


def test_requests_sharing_a_prefix_land_on_the_same_replica(run):
    seen, _, prefix_refs, _ = run
    px = seen["prefix"]
    assert [r["tokens"] for r in px] == prefix_refs
    fam_a, fam_b = {r["replica"] for r in px[0::2]}, {r["replica"] for r in px[1::2]}
    assert len(fam_a) == 1 and len(fam_b) == 1 and fam_a != fam_b, px
    # every request after a family's first went by affinity: the measured affinity hit rate is 1
    followers = px[2:]
    hit_rate = sum(r["reason"] == "affinity" for r in followers) / len(followers)
    print(f"prefix affinity hit rate {hit_rate:.2f} over {len(followers)} requests")
    assert hit_rate == 1.0, [(r["replica"], r["reason"]) for r in px]
    # /metrics counts the same decisions (outrider:router_requests_total{replica, reason})
    assert seen["router_metric"] == seen["decisions"]


def test_a_killed_replica_loses_no_request_that_had_not_streamed(run):
    seen, refs, _, after_refs = run
    kill = seen["kill"]
    assert len(kill) == 8
    # just before the kill, replica 0 held requests streaming and requests waiting for a slot
    assert any(seen["on_victim"].values()) and not all(seen["on_victim"].values()), seen["on_victim"]
    for i, r in enumerate(kill):
        if r["code"] is None:
            assert r["tokens"] == refs[i][:LONG], f"{r['id']} differs from plain decoding"
        else:   # only a request that had started streaming may fail, and with UNAVAILABLE
            assert r["code"] == "UNAVAILABLE" and r["tokens"], f"{r['id']} was lost before it streamed: {r}"
    moved = [r for r in kill if tuple(seen["kill_placed"][r["id"]]) == (1, "moved")]
    assert len(moved) == seen["moved"] >= 1, seen["kill_placed"]
    assert all(r["code"] is None for r in moved)
    assert seen["health_during"] == ["SERVING"], "the endpoint stopped serving while one replica was rebuilt"
    # the rebuilt replica serves again, exactly
    assert [r["code"] for r in seen["after"]] == [None, None]
    assert [r["tokens"] for r in seen["after"]] == after_refs
    assert sorted(seen["after_placed"]) == [0, 1], seen["after_placed"]
