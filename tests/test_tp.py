"""The target split over two tensor-parallel ranks (actors/model/tp/), on CPU over gloo: real processes.

Rank 0 runs in this process (the Verifier, or its model and cache alone), rank 1 in a spawned
process; they form a real gloo group. Checked: the split forward's logits against the whole
model's, SSD greedy against transformers, sampling against AR, a killed rank over a served
deployment, and the config errors.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import grpc
import pytest
import torch

from actors.generate import generate_ar
from actors.kv import PagedKVCache
from actors.model.loader import load_model
from actors.spec.sampling import SamplingParams
from actors.engine_spec import EngineSpec
from actors.spec.stopping import StopCriteria
from actors.model.tp.group import COMPILE_S, TPLead, group_timeout_s, indexed_device
from actors.model.tp.shard import rank_device
from actors.model.tp.worker import end_workers, spawn_workers
from cluster.config import ConfigError, load_config
from cluster.serving.coordinator import Coordinator, GenerateArgs
from cluster.launch.deployment import engine_spec
from tests.conftest import HF_NEW, assert_all_match_or_rare_near_ties, assert_same_outcome_law, wait_for

pytestmark = pytest.mark.timeout(300)
TP2 = {"models.target.tensor_parallel_size": 2, "cluster.launcher": "local"}


def test_split_logits_equal_the_whole_model(tiny_pair):
    """Prefill, then one batched verify step over a paged cache whose rows need a gather and a
    copy-on-write (a forked row writing into a shared block): rank 0's logits equal the model's."""
    target = str(tiny_pair / "target")
    # rank 0 compiles its forward below while the worker already waits in the first all-reduce:
    # the worker's group must outwait a compile (group_timeout_s), 30 s did not on a loaded machine
    spec = EngineSpec(target=target, mode="ar", tensor_parallel_size=2, max_batch=3, max_seq_len=96, kv_block_size=4,
                      timeout_s=600.0)
    port, procs = spawn_workers(spec)
    whole, part = load_model(target), load_model(target, tp=(0, 2))
    assert part.args.n_heads == 2 and part.args.n_kv_heads == 1 and part.args.intermediate_size * 2 == 176
    q = [m.model.layers[0].self_attn.q_proj.weight for m in (whole, part)]
    torch.testing.assert_close(q[1], q[0][:32])   # rank 0: the first 2 of 4 query heads of 16
    caches = [PagedKVCache.for_model(m.args, spec.target_blocks(), 4, spec.target_max_len) for m in (whole, part)]
    lead = TPLead(2, "cpu", 10.0, caches[1].pool)
    try:
        lead.connect("127.0.0.1", port, part)
        g = torch.Generator().manual_seed(0)

        def forward(tokens, pos, handles, last=False, run_part=part):
            kv_len, out = int(pos.max()) + 1, []
            with torch.inference_mode():
                for m, c in zip((whole, run_part), caches):
                    c.prepare(handles, pos, kv_len)
                    if m is run_part:
                        lead.call(tokens, pos, kv_len, last, c)
                    out.append(m(tokens, pos, c, kv_len=kv_len, last=last))
            return out

        lens = [37, 21]
        for n in lens:
            hs = [c.alloc() for c in caches]
            assert hs[0] == hs[1]
            a, b = forward(torch.randint(0, 512, (1, n), generator=g), torch.arange(n)[None], hs[:1], last=True)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
            for c in caches:
                c.advance(hs[0], n)
        forks = {c.fork(0, 30) for c in caches}   # position 30 sits in a block the fork shares with row 0
        assert len(forks) == 1
        pos = torch.tensor([list(range(s, s + 5)) for s in lens + [30]])
        a, b = forward(torch.randint(0, 512, (3, 5), generator=g), pos, [0, 1, forks.pop()])
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert caches[1].pool.copies == 1 and lead.calls == 3
        # The all-reduces are functional collectives: rank 0's forward still compiles whole.
        torch._dynamo.reset()
        compiled = torch.compile(part, fullgraph=True, dynamic=False)
        a, b = forward(torch.randint(0, 512, (3, 5), generator=g), pos + 5, [0, 1, 2], run_part=compiled)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    finally:
        lead.close()
        end_workers(procs, 10)
    assert [p.exitcode for p in procs] == [0]   # told to stop, it stopped


@pytest.fixture(scope="class")
def tp_engine(tiny_pair):
    """The SSD engine with a TP=2 target on plain processes: verifier here, rank 1 and the drafter
    spawned. Class-scoped: the TP group is this process's default group, one engine at a time."""
    from actors.launch import LocalEngine

    engine = LocalEngine(engine_spec(load_config("configs/local-cpu.yaml", {**TP2, "engine.max_batch": 16}))).start()
    coord = Coordinator(engine, None, max_queue=1024)
    yield engine, coord
    coord.stop()
    engine.stop()


class TestServing:
    def test_ssd_greedy_with_two_ranks_equals_transformers(self, tp_engine, hf_refs, held_out_prompts):
        engine, coord = tp_engine
        hf, refs = hf_refs
        prompts = held_out_prompts[:8]
        handles = [coord.submit(GenerateArgs(list(p), HF_NEW)) for p in prompts]
        finals = [h.result() for h in handles]
        assert_all_match_or_rare_near_ties(hf, prompts, [h.tokens for h in handles], refs[:8])
        assert sum(f.stats.drafts for f in finals) > 0 and sum(f.stats.cache_hits for f in finals) > 0
        assert engine.verifier.tp.calls > 0 and all(p.is_alive() for p in engine.tp_procs)


    def test_prefixes_cached_on_rank_0_serve_every_rank(self, tp_engine, hf_refs, held_out_prompts):
        """Rank 0 alone decides which cached blocks a prompt reuses; rank 1 holds the same keys/values
        in the same blocks because it replays every plan. The same prompts, twice: the second time
        they start on cached blocks and still equal transformers."""
        engine, coord = tp_engine
        hf, refs = hf_refs
        prompts = held_out_prompts[8:12]
        for _ in range(2):   # the second time from cached blocks
            handles = [coord.submit(GenerateArgs(list(p), HF_NEW)) for p in prompts]
            finals = [h.result() for h in handles]
            assert_all_match_or_rare_near_ties(hf, prompts, [h.tokens for h in handles], refs[8:12])
        assert all(f.cached_tokens >= len(p) - 16 for f, p in zip(finals, prompts)), [f.cached_tokens for f in finals]
        assert all(p.is_alive() for p in engine.tp_procs)

    def test_sampling_with_two_ranks_matches_ar(self, tp_engine, tiny_pair, held_out_prompts):
        """Tokens 2 and 3 pass through speculation on the split target; their joint law must be the
        whole target's (AR in this process, other seeds): a chi-square test on the histograms."""
        _, coord = tp_engine
        prompt, n, new = held_out_prompts[3][-32:], 300, 3
        handles = [coord.submit(GenerateArgs(list(prompt), new, SamplingParams(0.8, 6, seed=10_000 + i)))
                   for i in range(n)]
        for h in handles:
            h.result()
        split = [tuple(h.tokens[1:new]) for h in handles]
        target = load_model(tiny_pair / "target")
        whole = [tuple(generate_ar(target, prompt, StopCriteria(new), SamplingParams(0.8, 6, seed=i)).tokens[1:new])
                 for i in range(n)]
        assert_same_outcome_law(whole, split, "sampling on the split target")


# the plain-process launcher's run is in the slow set (19 s): the Ray one covers the same recovery
@pytest.mark.parametrize("launcher", [pytest.param("local", marks=pytest.mark.slow), "ray"])
def test_a_killed_rank_fails_open_streams_then_the_server_serves_again(launcher, request, held_out_prompts):
    """SIGKILL rank 1 mid-stream: open streams end UNAVAILABLE, the supervisor rebuilds every rank,
    health is SERVING again within 60 s and a new request completes. `local`: rank 0 in this very
    process, so the rebuild also re-forms this process's default group."""
    overrides = {**TP2, "cluster.launcher": launcher, "metrics.enabled": False, "engine.data_plane_timeout_s": 10}
    if launcher == "ray":
        server, client = request.getfixturevalue("serve_tiny")(overrides)
    else:   # the same server as serve_tiny's, without bringing Ray up
        from cluster.serving.client import OutriderClient
        from cluster.serving.server import OutriderServer

        cfg = load_config("configs/local-cpu.yaml", {**overrides, "server.port": 0, "http.port": 0})
        server = OutriderServer(cfg).start()
        client = OutriderClient(f"127.0.0.1:{server.port}")
    try:
        client.wait_ready()
        results: dict = {}

        def one(i):
            try:
                results[i] = client.generate_ids(held_out_prompts[i], max_new_tokens=400, ignore_eos=True)
            except grpc.RpcError as e:
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_for(lambda: server.coord.in_flight == 3, what="admission")
        wait_for(lambda: server.engine.metrics()["tokens"] > 12, what="streaming")
        old = server.engine
        os.kill(old.tp_pids()[0], signal.SIGKILL)
        t0 = time.monotonic()
        for t in threads:
            t.join(60)
        codes = [r.code() if isinstance(r, grpc.RpcError) else grpc.StatusCode.OK for r in results.values()]
        assert len(codes) == 3 and all(c == grpc.StatusCode.UNAVAILABLE for c in codes), codes
        wait_for(lambda: server.engine is not old and client.health() == "SERVING", 60, "SERVING again")
        assert time.monotonic() - t0 < 60 and server.supervisor.verifier_rebuilds == 1
        _, final = client.generate_ids(held_out_prompts[5], max_new_tokens=16)
        assert final.usage.completion_tokens == 16 and len(server.engine.tp_pids()) == 1
    finally:
        client.close()
        server.stop(grace_s=1)


def test_splits_that_cannot_work_are_config_errors(tiny_pair, tmp_path):
    target = tmp_path / "target"   # the tiny target with 3 KV heads of 6 query heads
    shutil.copytree(tiny_pair / "target", target)
    cfg = json.loads((target / "config.json").read_text())
    cfg.update(num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    (target / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        engine_spec(load_config("configs/local-cpu.yaml", {**TP2, "models.target.path": str(target)}))
    assert "models.target.tensor_parallel_size=2" in str(e.value) and "num_key_value_heads=3" in str(e.value)
    with pytest.raises(ConfigError, match="models.draft.tensor_parallel_size=2"):
        engine_spec(load_config("configs/local-cpu.yaml", {"models.draft.tensor_parallel_size": 2}))


def test_nccl_devices_always_carry_an_index():
    """torch.cuda.set_device and init_process_group(device_id=) refuse an index-less "cuda": every
    device a rank hands form_group resolves to "cuda:N" first (pure, so it runs without a GPU)."""
    # launcher local: rank r gets the r-th GPU after rank 0's, explicit indices stay
    assert [str(indexed_device(rank_device("cuda", r), env={})) for r in range(4)] == [f"cuda:{r}" for r in range(4)]
    assert indexed_device("cuda:3", env={"LOCAL_RANK": "1"}) == torch.device("cuda", 3)
    # Ray: every rank's spec says "cuda"; CUDA_VISIBLE_DEVICES leaves the actor its own GPU as index 0
    assert indexed_device("cuda", env={}, current=0) == torch.device("cuda", 0)
    # torchrun-style launchers name the local GPU
    assert indexed_device("cuda", env={"LOCAL_RANK": "2"}) == torch.device("cuda", 2)
    # with no CUDA here the current device defaults to 0; CPU devices pass through
    assert indexed_device("cuda", env={}).index == 0
    assert indexed_device("cpu", env={"LOCAL_RANK": "1"}) == torch.device("cpu")


def test_a_compiling_group_outwaits_a_compile():
    """A rank compiling a new bucket must not be aborted by the others' collective timeout."""
    assert group_timeout_s(30.0, compiles=False) == 30.0
    assert group_timeout_s(30.0, compiles=True) == COMPILE_S >= 600
    assert group_timeout_s(3600.0, compiles=True) == 3600.0
