"""The replica router's decisions (cluster/serving/router.py), and `cluster.replicas` in the config."""
from __future__ import annotations

import pytest

from cluster.config import ConfigError, parse_config
from cluster.serving.router import AFFINITY, LEAST_LOADED, Load, Router

A = list(range(100, 164))          # two prompts sharing their first 48 tokens
A2 = A[:48] + list(range(900, 916))
B = list(range(500, 564))


def idle(n: int = 2) -> list[Load]:
    return [Load() for _ in range(n)]


def test_idle_replicas_take_turns():
    r = Router()
    picks = []
    for p in (A, B, list(range(2000, 2064)), list(range(3000, 3064))):
        i, why = r.choose(p, idle())
        assert why == LEAST_LOADED
        r.record(p, i)
        picks.append(i)
    assert picks == [0, 1, 0, 1]


def test_least_loaded_by_depth_then_kv():
    r = Router()
    assert r.choose(B, [Load(depth=3), Load(depth=1), Load(depth=2)]) == (1, LEAST_LOADED)
    assert r.choose(B, [Load(depth=1, kv_usage=0.7), Load(depth=1, kv_usage=0.2)]) == (1, LEAST_LOADED)
    r.record(A, 1)   # a few blocks' difference in KV use does not outweigh taking turns
    assert r.choose(B, [Load(kv_usage=0.03), Load(kv_usage=0.0)]) == (0, LEAST_LOADED)


def test_a_shared_prefix_goes_where_it_went_before():
    r = Router()
    r.record(A, 1)
    assert r.choose(A2, [Load(), Load(depth=3)]) == (1, AFFINITY)   # busier, but not overloaded
    assert r.choose(B, [Load(), Load(depth=3)]) == (0, LEAST_LOADED)


def test_the_longest_remembered_prefix_wins():
    r = Router()
    r.record(A[:16] + list(range(700, 748)), 0)   # shares only the first block with A
    r.record(A, 1)
    assert r.choose(A2, idle()) == (1, AFFINITY)


def test_affinity_yields_to_an_overloaded_or_lost_home():
    r = Router(kv_high=0.9)
    r.record(A, 0)
    assert r.choose(A2, [Load(depth=4, max_batch=4), Load()]) == (1, LEAST_LOADED)   # batch full
    assert r.choose(A2, [Load(kv_usage=0.95), Load()]) == (1, LEAST_LOADED)           # KV nearly full
    assert r.choose(A2, [Load(up=False), Load()]) == (1, LEAST_LOADED)
    assert r.choose(A2, idle(), exclude=frozenset({0})) == (1, LEAST_LOADED)
    r.record(A2, 1)   # the shared prefix moves with it; A's own last block stays home
    assert r.choose(A2, idle()) == (1, AFFINITY)
    assert r.choose(A, idle()) == (0, AFFINITY)


def test_short_prompts_and_no_replica():
    r = Router(block=16)
    r.record(A[:15], 1)
    assert r.prefixes(A[:15]) == []
    assert r.choose(A[:15], [Load(), Load(depth=1)]) == (0, LEAST_LOADED)
    assert r.choose(A, [Load(up=False), Load(up=False)]) is None
    assert r.choose(A, idle(), exclude=frozenset({0, 1})) is None


def test_forget_and_capacity():
    r = Router(capacity=4, max_blocks=4)
    r.record(A, 1)
    r.forget(1)
    assert r.choose(A2, [Load(), Load()])[1] == LEAST_LOADED
    r.record(A, 0)          # 4 prefixes
    r.record(B, 1)          # 4 more: A's are dropped
    assert len(r._homes) == 4
    assert r.choose(A2, [Load(depth=1), Load()]) == (1, LEAST_LOADED)


BASE = {"models": {"target": {"path": "t"}, "draft": {"path": "d"}}}


@pytest.mark.parametrize("cluster, match", [
    ({"replicas": 0}, r"cluster\.replicas: Input should be greater than or equal to 1"),
    ({"replicas": "two"}, r"cluster\.replicas: Input should be a valid integer"),
    ({"replicas": 2, "launcher": "local"}, r"cluster\.replicas: 2 engine replicas are placed by Ray"),
    ({"replicas": 3, "num_cpus": 4},
     r"cluster\.replicas: 3 replica\(s\) of 2 CPU\(s\) each \(a verifier and 1 drafter\(s\)\) need 6"),
])
def test_replicas_config_errors_name_the_key(cluster, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({**BASE, "cluster": cluster})


def test_replicas_config():
    assert parse_config(BASE).cluster.replicas == 1
    assert parse_config({**BASE, "cluster": {"replicas": 2, "num_cpus": 4}}).cluster.replicas == 2
    pinned = {"target": {"path": "t", "cpus": [0]}, "draft": {"path": "d"}}
    cfg = parse_config({"cluster": {"replicas": 2}, "models": pinned})
    assert any("cluster.replicas=2" in w for w in cfg.warnings())
