"""The OpenAI-compatible HTTP API on a real server (127.0.0.1, ephemeral ports, a bearer token):
the official `openai` client for completions and chat, raw requests for every error, a fuzz of
bodies, a disconnect mid-stream, and 32 concurrent streams."""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import openai_client, serve_with_chat_template, wait_for

TOKEN = "http-test-token"
PROMPT = 'def read_config(path):\n    """Read a configuration file and return a dict."""\n    with'
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]



@pytest.fixture(scope="module")
def served(serve_tiny, tiny_pair, tmp_path_factory):
    os.environ["OUTRIDER_HTTP_TEST_TOKEN"] = TOKEN
    yield from serve_with_chat_template(
        serve_tiny, tiny_pair, tmp_path_factory, "http",
        {"server.auth_token_env": "OUTRIDER_HTTP_TEST_TOKEN", "server.max_queue": 40, "http.model_name": "tiny"},
        token=TOKEN)


@pytest.fixture(scope="module")
def oai(served):
    server, _ = served
    with openai_client(server, TOKEN) as c:
        yield c


def _raw(server, method: str, path: str, body=None, token: str | None = TOKEN, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
         **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out[0], json.loads(out[1]) if out[1] else None


# -- the official client --------------------------------------------------------------------------

def test_completion_equals_grpc(served, oai):
    _, client = served
    text, final = client.generate_text(PROMPT, max_new_tokens=24)
    r = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (final.usage.prompt_tokens, 24)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24
    spec = r.model_extra["metrics"]["speculative_decoding"]
    assert spec["drafts"] == final.stats.drafts > 0
    assert spec["acceptance_rate"] == pytest.approx(final.stats.acceptance_rate)


def test_streamed_completion_equals_grpc(served, oai):
    _, client = served
    text, _ = client.generate_text(PROMPT, max_new_tokens=24, stop=["format"])
    chunks = list(oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop="format",
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_equals_grpc(served, oai):
    _, client = served
    text, final = client.generate_text(CHAT, max_new_tokens=20)
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == final.usage.prompt_tokens
    stream = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == final.usage.completion_tokens


def test_a_repeated_system_prompt_hits_the_prefix_cache(served, oai):
    """SSD over Ray with the openai client: the same long system prompt twice. The second answer's
    usage reports the cached prompt tokens, the answer is the first's (which found nothing cached:
    no other test sends this system prompt), and /metrics counts hits on the target and the drafter."""
    server, _ = served
    system = ("You review Python modules for a standard library. Read each function, say what it "
              "returns, name every exception it raises, and keep answers short. ") * 3
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "def parse(text):"}]
    first = oai.chat.completions.create(model="tiny", messages=chat, max_tokens=16, temperature=0)
    again = oai.chat.completions.create(model="tiny", messages=chat, max_tokens=16, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 16 <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    from prometheus_client.parser import text_string_to_metric_families

    def hits() -> dict[str, float]:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
        return {s.labels["role"]: s.value for fam in text_string_to_metric_families(body)
                if fam.name == "outrider:prefix_cache_hits" for s in fam.samples}
    wait_for(lambda: hits().get("draft", 0) > 0, 10, "the drafter's prefix-cache hits on /metrics")
    assert hits()["target"] >= again.usage.prompt_tokens_details.cached_tokens


def test_extras_and_seeded_sampling(served, oai):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    a = oai.completions.create(**kw, extra_body={"top_k": 20, "k": 2})
    spec = a.model_extra["metrics"]["speculative_decoding"]
    assert a.usage.completion_tokens == 16
    assert spec["drafts"] > 0 and spec["draft_tokens"] <= 2 * spec["drafts"]                  # k = 2 at most
    assert sum(spec["k_histogram"][3:]) == 0 and sum(spec["k_histogram"][1:]) == spec["drafts"]
    server, _ = served
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'outrider:spec_decode_rounds_by_k_total{k="2"}' in scrape
    b = oai.completions.create(**kw, extra_body={"top_k": 20, "disable_speculation": True})
    again = oai.completions.create(**kw, extra_body={"top_k": 20, "disable_speculation": True})
    assert b.choices[0].text == again.choices[0].text                                         # seeded: repeatable
    assert b.model_extra["metrics"]["speculative_decoding"]["drafts"] == 0
    assert oai.models.list().data[0].id == "tiny"


# -- errors, in OpenAI's shape ----------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "k": 99}, 400, "k"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("/v1/completions", {"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
])
def test_bad_requests(served, path, body, status, param):
    server, _ = served
    code, out = _raw(server, "POST", path, body)
    assert code == status, out
    err = out["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_protocol_errors(served):
    server, _ = served
    code, out = _raw(server, "POST", "/v1/completions", b"{not json")
    assert code == 400 and "not valid JSON" in out["error"]["message"]
    code, out = _raw(server, "POST", "/v1/completions", b"[1, 2]")
    assert code == 400 and "JSON object" in out["error"]["message"]
    code, out = _raw(server, "POST", "/v1/completions", b"x" * (2 << 20))
    assert code == 413 and "http.max_body_bytes" in out["error"]["message"]
    code, out = _raw(server, "POST", "/v1/completions", {"prompt": PROMPT}, token=None)
    assert code == 401 and out["error"]["code"] == "invalid_api_key"
    code, out = _raw(server, "GET", "/v1/models", token="wrong")
    assert code == 401
    code, out = _raw(server, "GET", "/v1/nothing")
    assert code == 404 and out["error"]["code"] == "not_found"
    code, out = _raw(server, "GET", "/health", token=None)
    assert code == 200 and out["status"] == "SERVING"
    # unknown fields are ignored, as OpenAI's servers ignore them
    code, out = _raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "user": "u", "zzz": 1})
    assert code == 200 and out["usage"]["completion_tokens"] == 2


SCALARS = st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
JSONS = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=3), max_leaves=6)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
          "top_k", "k", "logprobs", "stream_options", "ignore_eos", "response_format", "structured_outputs",
          "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools", "tool_choice",
          "parallel_tool_calls"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(FIELDS), JSONS, max_size=6), chat=st.booleans())
def test_fuzzed_bodies_never_500(served, body, chat):
    server, _ = served
    mt = body.get("max_tokens", 2)
    if type(mt) is int and mt > 2:  # keep generation short; bad values stay bad
        mt = 2
    body["max_tokens"] = mt
    body.pop("stream", None)        # answers are read as one JSON document here
    code, out = _raw(server, "POST", "/v1/chat/completions" if chat else "/v1/completions",
                     json.dumps(body, allow_nan=True).encode())
    assert code in (200, 400, 404), (code, out)
    if code != 200 and out is not None and not isinstance(out, (str, int)):
        assert set(out["error"]) == {"message", "type", "param", "code"}


# -- streams: disconnects, concurrency, life cycle --------------------------------------------------

def test_disconnect_mid_stream_frees_the_sequence(served):
    server, _ = served
    tokens_before = server.engine.metrics()["tokens"]
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "temperature": 0, "stream": True}),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    got = b""
    while got.count(b"data:") < 3:
        got += r.read1(4096)
    wait_for(lambda: server.engine.metrics()["active"] == 1)
    conn.sock.close()
    conn.close()
    wait_for(lambda: server.engine.metrics()["active"] == 0)
    wait_for(lambda: server.engine.metrics()["drafter"]["seqs"] == 0)
    # aborted, not run to its end: far fewer than the 500 tokens it asked for were generated
    assert server.engine.metrics()["tokens"] - tokens_before < 400


def test_32_concurrent_streams_lose_nothing(served, oai):
    _, client = served
    prompts = [PROMPT, "import os\n", "class Config:\n    def", "for i in range("]
    refs = [client.generate_text(p, max_new_tokens=24)[0] for p in prompts]
    results: dict[int, tuple[str, int]] = {}

    def one(i):
        chunks = list(oai.completions.create(model="tiny", prompt=prompts[i % 4], max_tokens=24, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
        results[i] = ("".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 32
    assert all(results[i] == (refs[i % 4], 24) for i in range(32)), results


def test_health_follows_the_life_cycle(serve_tiny, tiny_pair):
    """/health answers 503 while the engine loads, 200 once it serves, 503 again while draining."""
    from cluster.config import load_config
    from cluster.serving.server import OutriderServer

    cfg = load_config("configs/local-cpu.yaml", {"server.port": 0, "metrics.enabled": False, "http.port": 0,
                                                 "server.max_queue": 1})
    server = OutriderServer(cfg)
    seen = []
    t = threading.Thread(target=server.start)
    t.start()
    try:
        wait_for(lambda: server.http_port is not None, 60)
        while t.is_alive() or not seen or seen[-1] != 200:
            code, _ = _raw(server, "GET", "/health", token=None)
            if not seen or seen[-1] != code:
                seen.append(code)
            time.sleep(0.02)
        assert seen == [503, 200], seen
        code, out = _raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert code == 200
        # a full queue is 429
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}))
        r = conn.getresponse()
        assert r.status == 200 and r.read1(4096).startswith(b"data:")
        code, out = _raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert code == 429 and out["error"]["code"] == "rate_limit_exceeded"
        conn.sock.close()
        conn.close()
        wait_for(lambda: server.coord.in_flight == 0)
        server.coord.draining = True
        assert _raw(server, "GET", "/health", token=None)[0] == 503
        code, out = _raw(server, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert code == 503 and "draining" in out["error"]["message"]
    finally:
        t.join(60)
        server.stop(grace_s=1)
