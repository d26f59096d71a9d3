"""Logprobs are exact under speculation: for AR, SD and SSD, greedy and sampled, every emitted
token's logprob and top-n alternatives equal transformers' teacher-forced log-probabilities of the
target over prompt + output (raw: log_softmax of the logits, before temperature/top-k/top-p).
Then the same through gRPC (real server, 127.0.0.1) and the openai client over HTTP, streaming
and not, and the 400s / INVALID_ARGUMENT for counts over 20."""
from __future__ import annotations

import grpc
import pytest
import torch

from actors.spec.logprobs import token_logprobs
from actors.spec.sampling import SamplingParams
from tests.conftest import openai_client, serve_with_chat_template

ATOL = 1e-4      # float32 log_softmax of our forward's logits against transformers' (logits agree to 2e-5)
N_TOP = 5
NEW = 24


@pytest.fixture(scope="module")
def hf(tiny_pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_pair / "target", dtype=torch.float32).eval()


def teacher_forced(hf, prompt: list[int], out: list[int]) -> torch.Tensor:
    """[len(out), V]: transformers' log-probabilities at each output position, given everything before."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + out])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)


def assert_exact(hf, prompt: list[int], out: list[int], entries: list, n_top: int) -> None:
    """Each entry (logprob, [(id, logprob), ...]) against the teacher-forced reference."""
    assert len(entries) == len(out) > 0
    ref = teacher_forced(hf, prompt, out)
    for i, (tok, (lp, top)) in enumerate(zip(out, entries)):
        assert abs(lp - float(ref[i, tok])) <= ATOL, (i, tok, lp, float(ref[i, tok]))
        assert len(top) == n_top
        ids, vals = [t for t, _ in top], [v for _, v in top]
        assert vals == sorted(vals, reverse=True)
        # the values at our ids, and the top-n values themselves (ids may swap within a near-tie)
        torch.testing.assert_close(torch.tensor(vals), ref[i, ids], atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(vals), ref[i].topk(n_top).values, atol=ATOL, rtol=0)


def test_token_logprobs_rows():
    logits = torch.randn(3, 50, dtype=torch.float64)
    got = token_logprobs(logits, [4, 7, 9], 2)
    ref = torch.log_softmax(logits.float(), -1)
    assert [e[0] for e in got] == [float(ref[0, 4]), float(ref[1, 7]), float(ref[2, 9])]
    assert got[1][1][0] == [int(ref[1].argmax()), float(ref[1].max())]
    assert token_logprobs(logits, [1, 2, 3], 0)[2] == [float(ref[2, 3]), []]


def run_engine(mode: str, jobs: list[tuple[list[int], SamplingParams]], n_top: int):
    """One LocalEngine (the verifier here, the drafter in a child; speculation.k = 4, fixed) runs
    every job at once with logprobs; returns each job's (tokens, logprob entries, final), plus the
    final of a request that asked for none."""
    from actors.launch import LocalEngine
    from cluster.config import load_config
    from cluster.serving.coordinator import Chunk, Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec

    spec = engine_spec(load_config("configs/local-cpu.yaml", {
        "cluster.launcher": "local", "speculation.mode": mode, "metrics.enabled": False}))
    engine = LocalEngine(spec).start()
    coord = Coordinator(engine, None)
    try:
        handles = [coord.submit(GenerateArgs(p, NEW, sp, ignore_eos=True, logprobs=n_top)) for p, sp in jobs]
        plain = coord.submit(GenerateArgs(jobs[0][0], 4, ignore_eos=True))
        items = [list(h) for h in handles]
        plain_items = list(plain)
    finally:
        coord.stop()
        engine.stop()
    assert all(c.logprobs is None for c in plain_items[:-1]) and plain_items[-1].finish_reason == "length"
    out = []
    for h, its in zip(handles, items):
        chunks = [c for c in its if isinstance(c, Chunk)]
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == h.tokens and len(tokens) == NEW
        out.append((tokens, [e for c in chunks for e in c.logprobs], its[-1]))
    return out


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_engine_logprobs_equal_teacher_forced(mode, hf, held_out_prompts):
    """Greedy and sampled requests side by side; with speculation, drafts were accepted, so the
    logprobs of accepted draft tokens, corrections and bonus tokens are all checked."""
    jobs = [(list(p), sp) for p in held_out_prompts[:2]
            for sp in (SamplingParams(), SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7))]
    results = run_engine(mode, jobs, N_TOP)
    for (prompt, sp), (tokens, entries, _) in zip(jobs, results):
        assert_exact(hf, prompt, tokens, entries, N_TOP)
        if sp.greedy:   # the emitted token is the most likely one
            assert all(lp == top[0][1] for lp, top in entries)
    accepted = sum(final.stats.accepted_tokens for _, _, final in results)
    assert (accepted > 0) == (mode != "ar")


# -- the serving front ends: gRPC and the openai client over HTTP, on a real SSD server -------------

PROMPT = 'def read_config(path):\n    """Read a configuration file and return a dict."""\n    with'
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def served(serve_tiny, tiny_pair, tmp_path_factory):
    yield from serve_with_chat_template(serve_tiny, tiny_pair, tmp_path_factory, "logprobs",
                                        {"http.model_name": "tiny"})


@pytest.fixture(scope="module")
def oai(served):
    server, _ = served
    with openai_client(server) as c:
        yield c


def grpc_logprobs(client, prompt, n_top: int, **kw) -> tuple[list[int], list]:
    chunks, final = client._collect(prompt, logprobs=n_top, **kw)
    assert final.usage.completion_tokens > 0
    ids = [t for c in chunks for t in c.token_ids]
    entries = [(e.logprob, [(a.token_id, a.logprob) for a in e.top]) for c in chunks for e in c.logprobs]
    assert [e.token_id for c in chunks for e in c.logprobs] == ids
    return ids, entries


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_grpc_logprobs_equal_teacher_forced(served, hf, tiny_tok, sampling):
    _, client = served
    prompt = tiny_tok.encode(PROMPT)
    ids, entries = grpc_logprobs(client, prompt, 4, max_new_tokens=20, ignore_eos=True, **sampling)
    assert len(ids) == 20
    assert_exact(hf, prompt, ids, entries, 4)
    chunks, _ = client._collect(prompt, max_new_tokens=4)   # not asked: none
    assert all(len(c.logprobs) == 0 for c in chunks)


def test_grpc_logprobs_over_20_is_invalid_argument(served):
    _, client = served
    with pytest.raises(grpc.RpcError) as e:
        client.generate_text(PROMPT, max_new_tokens=2, logprobs=21)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logprobs must be at most 20" in e.value.details()


def test_completions_logprobs(served, oai, hf, tiny_tok):
    """Whole and streamed answers agree, and both equal the teacher-forced target."""
    _, client = served
    prompt = tiny_tok.encode(PROMPT)
    ids, _ = grpc_logprobs(client, prompt, 0, max_new_tokens=16, ignore_eos=True)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=5, extra_body={"ignore_eos": True})
    r = oai.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == tiny_tok.decode(ids) and len(lp.tokens) == r.usage.completion_tokens == 16
    ref = teacher_forced(hf, prompt, ids)
    for i, (t, v, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs)):
        assert abs(v - float(ref[i, t])) <= ATOL
        assert 5 <= len(top) <= 6 and top[lp.tokens[i]] == v    # the top 5, and the emitted token
        torch.testing.assert_close(torch.tensor(sorted(top.values(), reverse=True)[:5]), ref[i].topk(5).values,
                                   atol=ATOL, rtol=0)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(16)]
    chunks = [c for c in oai.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs]
    streamed = [c.choices[0].logprobs for c in chunks]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    torch.testing.assert_close(torch.tensor([v for s in streamed for v in s.token_logprobs]),
                               torch.tensor(lp.token_logprobs), atol=ATOL, rtol=0)
    plain = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs(served, oai, hf):
    server, client = served
    prompt = server.tok.encode_chat(CHAT)
    ids, _ = grpc_logprobs(client, CHAT, 0, max_new_tokens=12, ignore_eos=True)   # the same greedy tokens
    kw = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True})
    r = oai.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(ids) == 12
    assert b"".join(bytes(c.bytes) for c in content).decode() == r.choices[0].message.content
    ref = teacher_forced(hf, prompt, ids)
    for i, (t, c) in enumerate(zip(ids, content)):
        assert abs(c.logprob - float(ref[i, t])) <= ATOL and bytes(c.bytes) == server.tok.token_bytes(t)
        assert len(c.top_logprobs) == 3 and c.logprob == c.top_logprobs[0].logprob   # greedy: the top token
        torch.testing.assert_close(torch.tensor([a.logprob for a in c.top_logprobs]), ref[i].topk(3).values,
                                   atol=ATOL, rtol=0)
    streamed = [c.choices[0].logprobs.content for c in oai.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [x.token for s in streamed for x in s] == [x.token for x in content]
    only = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in only.choices[0].logprobs.content)
    plain = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_logprobs_follow_stop_strings(served, oai):
    """Tokens cut by a stop string are not reported: one entry per token the client got."""
    for stream in (False, True):
        out = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, temperature=0, stop=["("],
                                     logprobs=1, stream=stream, stream_options={"include_usage": True} if stream
                                     else None)
        if stream:
            chunks = list(out)
            tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            n = chunks[-1].usage.completion_tokens
        else:
            tokens, text, n = out.choices[0].logprobs.tokens, out.choices[0].text, out.usage.completion_tokens
        assert len(tokens) == n and "(" not in text


@pytest.mark.parametrize("path,body,param,says", [
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": -1}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2, "top_logprobs": 2}, "top_logprobs", "chat parameter"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": 3}, "logprobs", "true or false"),
])
def test_bad_logprobs_are_400(served, path, body, param, says):
    import json
    import urllib.error
    import urllib.request

    server, _ = served
    req = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    err = json.loads(e.value.read())["error"]
    assert err["param"] == param and says in err["message"], err
