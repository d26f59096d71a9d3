"""Load and hostile input against a real server: nothing lost, every answer deliberate."""
from __future__ import annotations

import string
import threading

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.generate import generate_ar
from actors.model.loader import load_model
from actors.spec.stopping import StopCriteria
from cluster.rpc.outrider.v1 import outrider_pb2 as pb

CLIENTS, PER_CLIENT, NEW = 32, 3, 24
DELIBERATE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.ALREADY_EXISTS}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny({"metrics.enabled": False, "server.max_queue": 256})
    yield server, client
    client.close()
    server.stop(grace_s=1)


def test_32_clients_nothing_lost_all_exact(served, tiny_pair, held_out_prompts):
    server, client = served
    target = load_model(tiny_pair / "target")
    prompts = [held_out_prompts[i % len(held_out_prompts)][-40:] for i in range(CLIENTS)]
    refs = [generate_ar(target, p, StopCriteria(NEW)).tokens for p in prompts]
    results: dict[tuple[int, int], object] = {}

    def worker(c):
        for r in range(PER_CLIENT):
            try:
                results[c, r] = client.generate_ids(prompts[c], max_new_tokens=NEW, ignore_eos=True)
            except grpc.RpcError as e:
                results[c, r] = e

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(results) == CLIENTS * PER_CLIENT, "requests lost"
    wrong = [(c, r) for (c, r), v in results.items() if isinstance(v, grpc.RpcError) or v[0] != refs[c]]
    assert not wrong, f"{len(wrong)} requests failed or differ from AR greedy: {wrong[:5]}"
    assert server.coord.in_flight == 0


_text = st.one_of(st.text(max_size=40), st.text(alphabet=string.printable, max_size=8),
                  st.just(""), st.just("\x00"), st.just("😀" * 10))
_requests = st.fixed_dictionaries({}, optional={
    "prompt": _text,
    "prompt_ids": st.lists(st.integers(0, 2**32 - 1), max_size=30),
    "max_new_tokens": st.integers(0, 2**32 - 1),
    "temperature": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "top_k": st.integers(0, 2**32 - 1),
    "top_p": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(_text, max_size=40),
    "stop_token_ids": st.lists(st.integers(0, 2**32 - 1), max_size=80),
    "request_id": _text,
    "disable_speculation": st.booleans(),
})


def _build(fields: dict) -> pb.GenerateRequest:
    req = pb.GenerateRequest()
    for k, v in fields.items():
        if k == "prompt_ids":
            req.prompt_ids.ids.extend(v)
        elif k in ("stop", "stop_token_ids"):
            getattr(req, k).extend(v)
        else:
            setattr(req, k, v)
    if req.HasField("max_new_tokens") and req.max_new_tokens > 16:
        req.max_new_tokens = 16  # keep valid cases short; the large values are covered by test_server
    return req


def _fuzz(served, fields):
    server, client = served
    try:
        for _ in client.stub.Generate(_build(fields), timeout=60):
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in DELIBERATE, f"{code} for {fields}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(fields=_requests)
def test_fuzzed_requests_get_deliberate_statuses(served, fields):
    _fuzz(served, fields)


# Valid requests, so the fuzzer also reaches the engine: every sampling setting, stops, speculation
# on and off. The tiny pair's vocabulary has 512 ids.
_valid = st.fixed_dictionaries({
    "prompt_ids": st.lists(st.integers(0, 511), min_size=1, max_size=30),
    "max_new_tokens": st.integers(1, 16),
}, optional={
    "temperature": st.one_of(st.just(0.0), st.floats(0.05, 2.0)),
    "top_k": st.integers(0, 50),
    "top_p": st.floats(0.05, 1.0),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.lists(st.text(alphabet=string.printable, min_size=1, max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "disable_speculation": st.booleans(),
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(fields=_valid)
def test_fuzzed_valid_requests_complete(served, fields):
    _, client = served
    chunks, finals = [], []
    for resp in client.stub.Generate(_build(fields), timeout=60):
        (finals if resp.HasField("final") else chunks).append(resp)
    assert len(finals) == 1 and resp.HasField("final"), "exactly one Final, and it comes last"
    final = finals[0].final
    n = sum(len(c.chunk.token_ids) for c in chunks)
    assert final.finish_reason in ("length", "stop", "eos"), final.finish_reason
    assert final.usage.completion_tokens == n <= fields["max_new_tokens"]
    assert final.finish_reason != "length" or n == fields["max_new_tokens"]
    assert all(0 <= t < 512 for c in chunks for t in c.chunk.token_ids)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(fields=_requests)
def test_fuzzed_requests_1000(served, fields):
    _fuzz(served, fields)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=64))
def test_fuzzed_bytes_get_deliberate_statuses(served, blob):
    _, client = served
    raw = client.channel.unary_stream("/outrider.v1.Outrider/Generate", request_serializer=None,
                                      response_deserializer=pb.GenerateResponse.FromString)
    try:
        for _ in raw(blob, timeout=60):
            pass
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
    assert code in DELIBERATE, f"{code} for {blob!r}"


def test_server_healthy_after_fuzzing(served):
    server, client = served
    assert client.health() == "SERVING"
    assert client.generate_text("x = 1\n", max_new_tokens=4)[1].usage.completion_tokens == 4
    assert server.coord.in_flight == 0
