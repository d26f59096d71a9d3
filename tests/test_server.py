"""A real gRPC server on 127.0.0.1 (ephemeral port) over a real local Ray engine."""
from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
import ray
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cluster.rpc.outrider.v1 import outrider_pb2 as pb
from tests.conftest import HF_NEW, assert_matches_or_near_tie, wait_for

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny({"server.max_queue": 12, "server.max_new_tokens_limit": 1000})
    yield server, client
    client.close()
    server.stop(grace_s=1)


def test_concurrent_streams_equal_hf_greedy(served, hf_refs, held_out_prompts):
    server, client = served
    hf, refs = hf_refs
    n = 10
    results: dict[int, tuple] = {}

    def one(i):
        results[i] = client.generate_ids(held_out_prompts[i], max_new_tokens=HF_NEW)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == n
    exact = 0
    for i, (ids, final) in results.items():
        assert final.finish_reason == "length" and final.usage.completion_tokens == HF_NEW == len(ids)
        exact += assert_matches_or_near_tie(hf, held_out_prompts[i], ids, refs[i])
    assert exact >= n - 1
    assert sum(r[1].stats.drafts for r in results.values()) > 0


def test_text_stream_and_stats(served):
    _, client = served
    text, final = client.generate_text("def main():\n    return", max_new_tokens=24)
    assert final.usage.completion_tokens == 24 and final.usage.prompt_tokens > 0
    assert text and final.stats.time_to_first_token_s > 0 and final.stats.tokens_per_s > 0
    assert final.stats.mean_acceptance_length >= 1.0


def test_cancel_mid_stream_frees_the_sequence(served):
    server, client = served
    stream = client.generate("class Parser:\n    def", max_new_tokens=1000, ignore_eos=True)
    got = 0
    for item in stream:
        got += len(item.chunk.token_ids)
        if got >= 5:
            stream.cancel()
            break
    wait_for(lambda: server.coord.in_flight == 0)
    m = server.engine.metrics()
    wait_for(lambda: server.engine.metrics()["active"] == 0)
    wait_for(lambda: server.engine.metrics()["drafter"]["seqs"] == 0)
    assert m["drafter_ok"]
    assert client.health() == "SERVING"
    assert client.generate_text("x = ", max_new_tokens=4)[1].usage.completion_tokens == 4


def test_deadline_exceeded_frees_the_sequence(served):
    """The deadline surely reaches the engine: tokens of several rounds have come back before the
    verifier is paused (SIGSTOP), and the drafter is seen holding the sequence too; the deadline
    then runs out while the verifier is paused, and both actors must free the sequence."""
    server, client = served
    verifier = psutil.Process(server.engine.verifier_pid())
    stream = client.generate("import os\nimport", max_new_tokens=1000, ignore_eos=True, timeout=6)
    got, drafter_seqs = [], None
    try:
        with pytest.raises(grpc.RpcError) as e:
            for item in stream:
                got += item.chunk.token_ids
                if drafter_seqs is None and len(got) >= 16:  # rounds of verified drafts: the drafter has it
                    verifier.suspend()   # from here on, nothing finishes before the deadline
                    drafter_seqs = ray.get(server.engine.drafter.stats.remote(), timeout=10)["seqs"]
    finally:
        verifier.resume()
    assert drafter_seqs == 1, "the drafter never held the sequence"
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < len(got) < 1000
    wait_for(lambda: server.coord.in_flight == 0)
    wait_for(lambda: server.engine.metrics()["active"] == 0)
    wait_for(lambda: server.engine.metrics()["drafter"]["seqs"] == 0)
    assert client.generate_text("x = ", max_new_tokens=4)[1].usage.completion_tokens == 4


def test_abort_by_request_id(served):
    server, client = served
    stream = client.generate("def run(self):\n    for", max_new_tokens=1000, ignore_eos=True, request_id="job-7")
    next(stream)
    assert client.abort("job-7") is True
    finals = [i.final for i in stream if i.HasField("final")]
    assert finals and finals[0].finish_reason == "abort" and finals[0].request_id == "job-7"
    assert client.abort("no-such-job") is False


BAD = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": [10**6]}, "vocab"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 100_000}, "limit"),
    ({"prompt": [5] * 1000, "max_new_tokens": 100}, "context"),
    ({"prompt": [5] * 2000}, "context"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 100}, "stop"),
    ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"seed": 2**64 - 1}, "seed"),
    ({"request_id": "r" * 1000}, "request_id"),
]


@pytest.mark.parametrize("fields, words", BAD, ids=[w for _, w in BAD])
def test_invalid_requests_get_invalid_argument(served, fields, words):
    _, client = served
    kw = {"prompt": "hello", "max_new_tokens": 8} | fields
    with pytest.raises(grpc.RpcError) as e:
        client.generate_text(kw.pop("prompt"), **kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert words in e.value.details()
    assert client.health() == "SERVING"


def test_malformed_bytes_are_invalid_argument(served):
    server, client = served
    raw = client.channel.unary_stream("/outrider.v1.Outrider/Generate", request_serializer=None,
                                      response_deserializer=pb.GenerateResponse.FromString)
    bad_utf8 = b"\x0a\x02\xff\xfe"   # field 1 (prompt), length 2, not UTF-8
    for blob in (bad_utf8, b"\xff\xff\xff"):
        with pytest.raises(grpc.RpcError) as e:
            list(raw(blob))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


def test_queue_full_is_resource_exhausted(served):
    server, client = served
    streams = [client.generate(f"def f{i}(x):\n    return", max_new_tokens=1000, ignore_eos=True) for i in range(12)]
    # 12 x 1000 tokens keep the engine busy for seconds: the queue is full right after submission.
    wait_for(lambda: server.coord.in_flight == 12, timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        client.generate_text("one too many", max_new_tokens=4)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    for s in streams:
        s.cancel()
    wait_for(lambda: server.coord.in_flight == 0)


def test_health_info_reflection_metrics(served):
    server, client = served
    assert client.health() == "SERVING" and client.health("outrider.v1.Outrider") == "SERVING"
    info = client.info()
    assert info.mode == "ssd" and info.k == 4 and info.versions["outrider"] and info.max_seq_len == 1024
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = db.get_services()
    assert "outrider.v1.Outrider" in services and "grpc.health.v1.Health" in services
    methods = {m.name for m in db.FindFileContainingSymbol("outrider.v1.Outrider").service[0].method}
    assert methods == {"Generate", "Abort", "GetInfo"}
    client.generate_text("def main():\n    return", max_new_tokens=16)   # drafts of its own: no test order
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    drafts = [ln for ln in body.splitlines() if ln.startswith("outrider:spec_decode_num_drafts_total ")]
    assert drafts and float(drafts[0].split()[1]) > 0
    for name in ("outrider:time_to_first_token_seconds_bucket", "outrider:verifier_seconds_total",
                 "outrider:spec_cache_hits_total", "outrider:drafter_seconds_total"):
        assert name in body, name


def _load_gauges(port: int) -> dict[tuple[str, str], float]:
    """{(name, replica label or ''): value} for vLLM's three load gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = ("outrider:num_requests_running", "outrider:num_requests_waiting", "outrider:kv_cache_usage_perc")
    return {(s.name, s.labels.get("replica", "")): s.value
            for fam in text_string_to_metric_families(body) if fam.name in names for s in fam.samples}


def test_load_gauges_follow_a_running_stream(served):
    """KV use, waiting and running, per replica and in total, as vLLM names them: a stream in
    flight holds KV blocks and a batch slot; cancelled, it gives them back."""
    server, client = served
    wait_for(lambda: server.coord.in_flight == 0)
    def start():
        s = client.generate("class Parser:\n    def", max_new_tokens=1000, ignore_eos=True)
        next(iter(s))
        return s
    stream = start()
    seen: dict = {}

    def busy() -> bool:
        nonlocal stream
        gauges = _load_gauges(server.metrics_port)
        if gauges.get(("outrider:kv_cache_usage_perc", "0"), 0) > 0:
            seen.update(gauges)
            return True
        if server.coord.in_flight == 0:   # the tiny pair can finish 1000 tokens between two scrapes: go again
            stream = start()
        return False
    wait_for(busy, 30, "KV use above 0 with a stream in flight")
    assert 0 < seen[("outrider:kv_cache_usage_perc", "")] <= 1
    assert seen[("outrider:kv_cache_usage_perc", "")] == seen[("outrider:kv_cache_usage_perc", "0")]
    assert seen[("outrider:num_requests_running", "0")] == 1 and seen[("outrider:num_requests_running", "")] == 1
    assert seen[("outrider:num_requests_waiting", "0")] == 0 == seen[("outrider:num_requests_waiting", "")]
    stream.cancel()
    wait_for(lambda: _load_gauges(server.metrics_port)[("outrider:kv_cache_usage_perc", "0")] == 0, 30,
             "KV blocks given back")
    idle = _load_gauges(server.metrics_port)
    assert idle[("outrider:num_requests_running", "0")] == 0 == idle[("outrider:num_requests_running", "")]
