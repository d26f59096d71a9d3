"""Structured outputs through the serving front ends: the openai client's response_format, vLLM's
extras and forced tool calls over HTTP, the same on gRPC, bad constraints as 400s /
INVALID_ARGUMENT with a message, and a real pair's schema answer equal to its answer without
drafts. Exactness under speculation, engine-level, is tests/test_structured.py's.
"""
from __future__ import annotations

import json

import grpc
import pytest

from tests import test_logprobs
from tests.conftest import openai_client
from tests.test_structured import NEW, SCHEMA, valid

pytestmark = pytest.mark.timeout(900)

# -- the serving front ends: the openai client over HTTP and gRPC, on a real SSD server -------------

served, oai = test_logprobs.served, test_logprobs.oai   # the fixtures: a ChatML server, its openai client
CHAT = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Who are you?"}]


def test_openai_response_format_json_schema(oai):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for kw in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.8, "seed": 6}):
        r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, response_format=fmt, **kw)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert valid(json.loads(choice.message.content)), choice.message.content
    stream = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, response_format=fmt,
                                         temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert valid(json.loads(text))


def test_openai_json_object_and_vllm_extras(oai):
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=NEW, temperature=0,
                                    response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:   # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.lstrip().startswith("{")
    for extra, ok in [({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
                      ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
                      ({"structured_outputs": {"regex": "[0-9]{3}-[0-9]{2}"}}, lambda t: len(t) == 6 and t[3] == "-"),
                      ({"guided_grammar": 'root ::= "x" [0-9] [0-9]?'}, lambda t: t[0] == "x" and t[1:].isdigit()),
                      ({"guided_json": SCHEMA}, lambda t: valid(json.loads(t)))]:
        r = oai.completions.create(model="tiny", prompt="The answer:", max_tokens=NEW, temperature=0, extra_body=extra)
        assert r.choices[0].finish_reason == "stop" and ok(r.choices[0].text), (extra, r.choices[0].text)


def test_grpc_structured(served, tiny_tok):
    from cluster.rpc.outrider.v1 import outrider_pb2 as pb

    _, client = served
    text, final = client.generate_text("The answer:", max_new_tokens=NEW, structured=pb.StructuredOutput(
        json_schema=json.dumps(SCHEMA)))
    assert final.finish_reason in ("eos", "stop") and valid(json.loads(text)), text
    text, _ = client.generate_text("The answer:", max_new_tokens=NEW, structured=pb.StructuredOutput(
        choice=pb.Choices(options=["a b", "c"])))
    assert text in ("a b", "c")
    with pytest.raises(grpc.RpcError) as e:
        client.generate_text("x", max_new_tokens=4, structured=pb.StructuredOutput(regex="(unclosed"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "regex" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        client.generate_text("x", max_new_tokens=4, structured=pb.StructuredOutput(json_schema="{"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in e.value.details()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "additionalProperties": False, "required": ["city", "days"],
             "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"enum": [1, 2, 3]}}}}},
         {"type": "function", "function": {"name": "ping"}}]


def test_forced_tool_calls(oai):
    """tool_choice naming a function, or "required": the answer is a call, returned as tool_calls
    whose arguments match the function's schema; streamed, the call comes as one delta."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = {"model": "tiny", "messages": CHAT, "max_tokens": NEW, "temperature": 0, "tools": TOOLS}
    r = oai.chat.completions.create(tool_choice=named, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(args) == {"city", "days"} and len(args["city"]) <= 8 and args["days"] in (1, 2, 3)
    r = oai.chat.completions.create(tool_choice="required", parallel_tool_calls=False, **kw)
    (one,) = r.choices[0].message.tool_calls   # (the tiny pair, left to it, calls ping forever)
    assert r.choices[0].finish_reason == "tool_calls" and one.function.name in ("get_weather", "ping")
    assert isinstance(json.loads(one.function.arguments), dict)
    chunks = list(oai.chat.completions.create(tool_choice=named, stream=True, **kw))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = oai.chat.completions.create(tool_choice="none", **kw)   # tools ignored: text
    assert plain.choices[0].message.tool_calls is None

@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}, "response_format",
     "invalid json_schema"),
    ({"guided_regex": "[a-"}, "response_format", "invalid regex"),
    ({"guided_grammar": "root ::= undefined_rule"}, "response_format", "invalid ebnf"),
    ({"guided_choice": []}, "response_format", "choice"),
    ({"guided_choice": "yes"}, "guided_choice", "list of strings"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs", "unsupported keys"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "one structured-output"),
    ({"tools": TOOLS}, "tool_choice", "tool_choice 'auto'"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "already"),
])
def test_bad_constraints_are_400(served, body, param, words):
    import http.client

    server, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": CHAT, "max_tokens": 4, **body}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    out = json.loads(r.read())
    conn.close()
    assert r.status == 400, out
    assert out["error"]["param"] == param and words in out["error"]["message"], out
    assert ".cc:" not in out["error"]["message"]


def test_real_pair_answers_the_schema_over_http_exactly(serve_tiny, smol_pair):
    """SmolLM2-135M-Instruct in SSD (its cheap drafter, K = 4) through the openai client: the
    json_schema answer parses, validates, and equals the same request decoded without drafts."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "city": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    server, client = serve_tiny({"models.target.path": "demo:smol/target", "models.draft.path": "demo:smol/cheap",
                                 "models.target.dtype": "float32", "models.draft.dtype": "float32",
                                 "speculation.adaptive": False, "http.model_name": "smol"})
    try:
        with openai_client(server) as oai:
            answers = []
            for extra in ({}, {"disable_speculation": True}):
                r = oai.chat.completions.create(
                    model="smol", max_tokens=120, temperature=0, extra_body=extra,
                    messages=[{"role": "user", "content": "Describe Alice, who lives in Paris, as JSON."}],
                    response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
                assert r.choices[0].finish_reason == "stop"
                answers.append((r.choices[0].message.content, r.model_extra["metrics"]["speculative_decoding"]))
    finally:
        client.close()
        server.stop(grace_s=1)
    (text, spec), (plain, plain_spec) = answers
    doc = json.loads(text)
    assert set(doc) == {"name", "age", "city"} and type(doc["age"]) is int and 0 <= doc["age"] <= 120
    assert text == plain and spec["drafts"] > 0 and plain_spec["drafts"] == 0
