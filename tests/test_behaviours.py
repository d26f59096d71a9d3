"""Behaviours the README promises, through the real gRPC server on a real local Ray engine:
the `ngram` and `none` backups, greedy and sampling requests batched together, seeded sampling,
a request exactly at max_seq_len, aborts while queued / during prefill / racing the natural
finish, Prometheus values against the Finals, an EOS finish, and a duplicate request_id."""
from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HF_NEW, assert_matches_or_near_tie, wait_for

pytestmark = pytest.mark.timeout(600)
BATCH = 4          # engine.max_batch of the shared server: a fifth long request has to queue
SAMPLED = dict(temperature=0.9, top_k=8)



def _drafter_seqs(server) -> int:
    return ray.get(server.engine.drafter.stats.remote(), timeout=30)["seqs"]


def _idle(server):
    """Nothing left anywhere: coordinator, verifier (running and waiting), drafter."""
    wait_for(lambda: server.coord.in_flight == 0, what="coordinator empty")
    wait_for(lambda: (lambda m: m["active"] == 0 and m["waiting"] == 0)(server.engine.metrics()), what="verifier empty")
    wait_for(lambda: _drafter_seqs(server) == 0, what="drafter empty")


def _collect(stream):
    ids, final = [], None
    for item in stream:
        if item.HasField("chunk"):
            ids += item.chunk.token_ids
        else:
            final = item.final
    return ids, final


def _concurrently(fns):
    out: dict = {}

    def run(i, fn):
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 (reported below, as the test's failure)
            out[i] = e

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in range(len(fns)):
        assert i in out and not isinstance(out[i], Exception), f"call {i}: {out.get(i)!r}"
    return [out[i] for i in range(len(fns))]


@pytest.fixture(scope="module")
def served(serve_tiny):
    server, client = serve_tiny({"server.max_new_tokens_limit": 1024, "engine.max_batch": BATCH})
    yield server, client
    client.close()
    server.stop(grace_s=1)


# -- speculation on misses ---------------------------------------------------------------------
@pytest.mark.parametrize("backup", ["ngram", "none"])
def test_backups_on_misses_stay_exact(serve_tiny, hf_refs, held_out_prompts, backup):
    """On a cache miss the drafter drafts with the n-gram proposer, or not at all: output stays the
    target's greedy output, and misses really happened (so the backup really ran)."""
    hf, refs = hf_refs
    server, client = serve_tiny({"speculation.backup": backup, "metrics.enabled": False})
    try:
        assert client.info().backup == backup
        n = 6
        results = _concurrently([lambda i=i: client.generate_ids(held_out_prompts[i], max_new_tokens=HF_NEW)
                                 for i in range(n)])
    finally:
        client.close()
        server.stop(grace_s=1)
    exact = 0
    for i, (ids, final) in enumerate(results):
        assert final.finish_reason == "length" and len(ids) == HF_NEW == final.usage.completion_tokens
        exact += assert_matches_or_near_tie(hf, held_out_prompts[i], ids, refs[i])
    assert exact >= n - 1
    assert sum(f.stats.cache_misses for _, f in results) > 0, "no miss: the backup never ran"
    assert sum(f.stats.cache_hits for _, f in results) > 0, "speculation did not run at all"


# -- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_repeats_and_seeds_differ(served, held_out_prompts):
    _, client = served
    prompt = held_out_prompts[2]
    a, fa = client.generate_ids(prompt, max_new_tokens=48, seed=1234, **SAMPLED)
    b, fb = client.generate_ids(prompt, max_new_tokens=48, seed=1234, **SAMPLED)
    c, _ = client.generate_ids(prompt, max_new_tokens=48, seed=4321, **SAMPLED)
    assert fa.finish_reason == fb.finish_reason == "length" and len(a) == 48
    assert a == b, "the same seed gave two different continuations"
    assert a != c, "two seeds gave the same 48 sampled tokens"


def test_greedy_and_sampling_batched_together_are_both_exact(served, hf_refs, held_out_prompts):
    """Two greedy and two seeded sampling requests share the batch: greedy equals transformers,
    sampling equals the same seed run alone."""
    _, client = served
    hf, refs = hf_refs
    greedy, sampled = [0, 1], [4, 5]
    calls = [lambda i=i: client.generate_ids(held_out_prompts[i], max_new_tokens=HF_NEW) for i in greedy]
    calls += [lambda i=i: client.generate_ids(held_out_prompts[i], max_new_tokens=HF_NEW, seed=77 + i, **SAMPLED)
              for i in sampled]
    together = _concurrently(calls)
    for i, (ids, final) in zip(greedy, together[:2]):
        assert final.finish_reason == "length" and len(ids) == HF_NEW
        assert_matches_or_near_tie(hf, held_out_prompts[i], ids, refs[i])
    for i, (ids, final) in zip(sampled, together[2:]):
        alone, _ = client.generate_ids(held_out_prompts[i], max_new_tokens=HF_NEW, seed=77 + i, **SAMPLED)
        assert final.finish_reason == "length" and len(ids) == HF_NEW
        assert ids == alone, f"prompt {i}: a seeded request batched with others differs from it alone"
    assert sum(f.stats.drafts for _, f in together) > 0


# -- the context limit -------------------------------------------------------------------------
def test_request_exactly_at_max_seq_len(served, hf_refs, tiny_tok):
    from cluster.models.corpus import prompts

    server, client = served
    hf, _ = hf_refs
    max_seq = client.info().max_seq_len
    new = 24
    long_text = "\n".join(prompts("code", 40))
    prompt = tiny_tok.encode(long_text)[:max_seq - new]
    assert len(prompt) + new == max_seq
    ids, final = client.generate_ids(prompt, max_new_tokens=new, ignore_eos=True)
    assert final.finish_reason == "length" and final.usage.completion_tokens == new == len(ids)
    assert final.usage.prompt_tokens == len(prompt)
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
    assert_matches_or_near_tie(hf, prompt, ids, ref.tolist())
    with pytest.raises(grpc.RpcError) as e:   # one more token does not fit
        client.generate_ids(prompt, max_new_tokens=new + 1)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details()
    _idle(server)


# -- aborts ------------------------------------------------------------------------------------
def test_abort_while_queued(served, held_out_prompts):
    """With every slot taken the next request waits in the verifier's queue; aborted there it ends
    with no tokens, and it never reached the drafter."""
    server, client = served
    _idle(server)
    blockers = [client.generate(held_out_prompts[i], max_new_tokens=900, ignore_eos=True) for i in range(BATCH)]
    try:
        for b in blockers:
            next(b)
        assert server.engine.metrics()["active"] == BATCH
        queued = client.generate(held_out_prompts[BATCH], max_new_tokens=16, request_id="queued-1")
        wait_for(lambda: server.engine.metrics()["waiting"] == 1, what="the request queued in the verifier")
        assert _drafter_seqs(server) == BATCH
        assert client.abort("queued-1") is True
        ids, final = _collect(queued)
        assert final.finish_reason == "abort" and final.request_id == "queued-1"
        assert ids == [] and final.usage.completion_tokens == 0
        assert server.engine.metrics()["waiting"] == 0
    finally:
        for b in blockers:
            b.cancel()
    _idle(server)


def test_abort_during_prefill(served, tiny_tok):
    """Aborts sent right behind the request (a long prompt, so prefill is the longest phase): as
    soon as the coordinator holds it, then a few milliseconds later. Each ends as an abort long
    before its length, with usage equal to the tokens streamed (0: caught before admission, 1:
    during the prefill that produced the first token), a prefix of the greedy output, and both
    actors free it."""
    from cluster.models.corpus import prompts

    server, client = served
    _idle(server)
    prompt = tiny_tok.encode("\n".join(prompts("text", 40)))[:600]
    new = 400
    ref, _ = client.generate_ids(prompt, max_new_tokens=new)
    seen = []
    for attempt, delay_s in enumerate((0.0, 0.0, 0.002, 0.005, 0.01)):
        rid = f"prefill-{attempt}"
        stream = client.generate(prompt, max_new_tokens=new, request_id=rid)
        wait_for(lambda rid=rid: server.coord.find(rid) is not None, 30, "the coordinator holding the request")
        time.sleep(delay_s)
        assert client.abort(rid) is True
        ids, final = _collect(stream)
        assert final.finish_reason == "abort" and final.request_id == rid, (attempt, final.finish_reason)
        assert final.usage.completion_tokens == len(ids) < new
        assert ids == ref[:len(ids)], f"attempt {attempt}: the tokens returned are not the greedy prefix"
        seen.append(len(ids))
        _idle(server)
    print(f"tokens streamed before the abort took effect: {seen}")


def test_abort_racing_the_natural_finish(served, held_out_prompts):
    """Abort sent as the last tokens come in: either it wins (an abort, usage equal to the tokens
    returned, a prefix of the greedy output) or the natural finish does (length, every token);
    nothing leaks either way."""
    server, client = served
    _idle(server)
    new = 24
    ref, _ = client.generate_ids(held_out_prompts[6], max_new_tokens=new)
    outcomes = []
    for trigger in (1, 8, 16, 20, 23, 24):
        rid = f"race-{trigger}"
        stream = client.generate(held_out_prompts[6], max_new_tokens=new, request_id=rid)
        ids, final, found = [], None, None
        for item in stream:
            if item.HasField("chunk"):
                ids += item.chunk.token_ids
                if found is None and len(ids) >= trigger:
                    found = client.abort(rid)
            else:
                final = item.final
        assert final is not None and final.usage.completion_tokens == len(ids)
        assert ids == ref[:len(ids)], f"trigger {trigger}: the tokens returned are not the greedy prefix"
        if final.finish_reason == "length":
            assert ids == ref
        else:
            assert final.finish_reason == "abort" and found is True and len(ids) < new, (trigger, final)
        assert client.abort(rid) is False, "a finished request is still findable"
        outcomes.append((trigger, final.finish_reason, len(ids)))
    print(f"abort races: {outcomes}")
    _idle(server)


# -- metrics -----------------------------------------------------------------------------------
def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_metric_values_equal_the_summed_finals(served, held_out_prompts):
    server, client = served
    _idle(server)
    before = _scrape(server.metrics_port)
    finals = [f for _, f in _concurrently(
        [lambda i=i: client.generate_ids(held_out_prompts[i], max_new_tokens=40 + i) for i in range(6)])]
    finals.append(client.generate_ids(held_out_prompts[7], max_new_tokens=20, seed=5, **SAMPLED)[1])
    after = _scrape(server.metrics_port)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    P = "outrider:"
    s = [f.stats for f in finals]
    assert delta(P + "spec_decode_num_drafts_total") == sum(x.drafts for x in s) > 0
    assert delta(P + "spec_decode_num_draft_tokens_total") == sum(x.draft_tokens for x in s)
    assert delta(P + "spec_decode_num_accepted_tokens_total") == sum(x.accepted_tokens for x in s)
    for pos in range(max(len(x.accepted_per_position) for x in s)):
        want = sum(x.accepted_per_position[pos] for x in s if pos < len(x.accepted_per_position))
        assert delta(P + "spec_decode_num_accepted_tokens_per_pos_total", position=str(pos)) == want, pos
    assert delta(P + "spec_cache_hits_total") == sum(x.cache_hits for x in s) > 0
    assert delta(P + "spec_cache_misses_total") == sum(x.cache_misses for x in s)
    assert delta(P + "generation_tokens_total") == sum(f.usage.completion_tokens for f in finals)
    assert delta(P + "prompt_tokens_total") == sum(f.usage.prompt_tokens for f in finals)
    assert delta(P + "request_success_total", finished_reason="length") == len(finals)
    assert delta(P + "e2e_request_latency_seconds_count") == len(finals)
    assert delta(P + "time_to_first_token_seconds_count") == len(finals)
    assert after[(P + "num_requests_running", ())] == 0


# -- finishes and ids --------------------------------------------------------------------------
def test_eos_finish(served, tiny_tok):
    """A sampled continuation that draws EOS ends there with finish_reason "eos" (the proto's
    name for it), the EOS id last in the tokens and counted in usage, and no text for it."""
    server, client = served
    eos = set(tiny_tok.eos_token_ids)
    assert eos
    ended = []
    for seed in range(0, 64, BATCH):
        results = _concurrently([lambda s=s: client.generate_ids("\n", max_new_tokens=400, seed=s, temperature=1.5)
                                 for s in range(seed, seed + BATCH)])
        ended += [(ids, f) for ids, f in results if ids and ids[-1] in eos]
        for ids, f in results:
            assert (ids[-1] in eos) == (f.finish_reason != "length"), (f.finish_reason, ids[-3:])
            assert not eos & set(ids[:-1]), "tokens continued after EOS"
        if ended:
            break
    assert ended, "no sampled continuation drew EOS"
    ids, final = ended[0]
    assert final.finish_reason == "eos", final.finish_reason
    assert final.usage.completion_tokens == len(ids) < 400
    _idle(server)


def test_duplicate_request_id_is_already_exists(served, held_out_prompts):
    server, client = served
    first = client.generate(held_out_prompts[0], max_new_tokens=900, ignore_eos=True, request_id="dup-1")
    try:
        next(first)
        with pytest.raises(grpc.RpcError) as e:
            client.generate_ids(held_out_prompts[1], max_new_tokens=4, request_id="dup-1")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dup-1" in e.value.details()
        assert client.abort("dup-1") is True
        _, final = _collect(first)
        assert final.finish_reason == "abort" and final.request_id == "dup-1"
    finally:
        first.cancel()
    ids, final = client.generate_ids(held_out_prompts[1], max_new_tokens=4, request_id="dup-1")
    assert final.finish_reason == "length" and final.request_id == "dup-1" and len(ids) == 4
    _idle(server)
