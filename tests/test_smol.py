"""The real pretrained pair (SmolLM2-135M-Instruct from its GGUF) against transformers.

The reference is transformers' own GGUF loading of the very same file
(`from_pretrained(dir, gguf_file=...)`, its own dequantizer, Q/K un-permutation and tokenizer
conversion), never outrider's import of it. Exactness of SSD uses the cheap drafter (the
target's first layers): it drafts badly, so nearly every round goes through rejection and
correction, which is the path exactness depends on.
"""
from __future__ import annotations

import pytest
import torch

from cluster.models.chat_prompts import HELD_OUT
from cluster.models.smol import fetch_gguf
from actors.model.loader import load_model
from actors.model.tokenizer import Tokenizer
from tests.conftest import assert_matches_or_near_tie, hf_greedy
from actors.spec.stats import SpecStats

pytestmark = pytest.mark.timeout(900)
NEW = 64

TEXTS = [
    "def parse(text):\n    return [int(x) for x in text.split(',') if x.strip()]\n",
    "class Foo(Bar):\n\tdef __init__(self, *args, **kw):\n\t\tsuper().__init__(*args, **kw)  # 12345 67\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé: naïve café, 日本語のテキスト, 中文, emoji 🎉🚀👍🏽, math ∑∫√π ≠ ≤, tabs\tand\r\nCRLF",
    "   leading spaces,   runs   of  spaces, trailing   \n\n\n   \n",
    "<|endoftext|><file_sep>x = 1<|im_end|>it's they're I'll we've 3.14159e-10 0x1F",
]

# Held-out chat requests (the drafter's distillation prompts never contain these).
CHAT = HELD_OUT[:6]


@pytest.fixture(scope="module")
def gguf_file():
    return fetch_gguf()


@pytest.fixture(scope="module")
def hf_gguf(gguf_file):
    """transformers' model and tokenizer, loaded from the GGUF itself (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf_file.name)
    tok = AutoTokenizer.from_pretrained(gguf_file.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kw).eval()
    return model, tok


def test_tokenizer_matches_transformers_gguf(smol_pair, hf_gguf):
    target, _ = smol_pair
    _, htok = hf_gguf
    ours = Tokenizer(target)
    assert ours.vocab_size == htok.vocab_size == 49152
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == htok(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == htok.decode(ids, skip_special_tokens=True)
    chat = ours.encode(TEXTS[2])
    assert chat[0] == 1 and chat.count(2) == 2  # <|im_start|>, <|im_end|> stay whole


def test_checkpoint_files(smol_pair):
    import json

    target, cheap = smol_pair
    cfg = json.loads((target / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"]) == (30, 576, 9, 3)
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    tcfg = json.loads((target / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and tcfg["eos_token"] == "<|im_end|>"
    assert json.loads((cheap / "config.json").read_text())["num_hidden_layers"] < 30


def test_logits_match_transformers_gguf(smol_pair, hf_gguf):
    """Full forward, and prefill + cached decode, equal transformers' logits (float32)."""
    from actors.kv import PagedKVCache

    target, _ = smol_pair
    hf, htok = hf_gguf
    model = load_model(target)
    ids = htok(TEXTS[0] + TEXTS[2] + TEXTS[3], add_special_tokens=False).input_ids
    x = torch.tensor([ids])
    # Logits reach ~40 here: oneDNN's packed float32 matmuls (actors/model/packed.py) and transformers'
    # MKL ones round differently by a few ulps per layer, ~1e-4 after 30 layers.
    atol = 2e-4
    with torch.inference_mode():
        ref = hf(x).logits
        full = model(x)
        torch.testing.assert_close(full, ref, rtol=0, atol=atol)
        cache = PagedKVCache.for_rows(model.args, 1, len(ids))
        handle = torch.tensor([cache.alloc()])
        half = len(ids) // 2
        pre = model(x[:, :half], torch.arange(half)[None], cache, handle)
        steps = [model(x[:, i:i + 1], torch.tensor([[i]]), cache, handle) for i in range(half, len(ids))]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), ref, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def smol_prompts(hf_gguf):
    """6 held-out code prompts (standard-library source) and 6 chat requests rendered with the
    checkpoint's chat template by transformers."""
    from cluster.models.corpus import prompts

    _, htok = hf_gguf
    code = [htok(t, add_special_tokens=False).input_ids[-96:] for t in prompts("code", 6, seed=16)]
    chat = []
    for text in CHAT:
        rendered = htok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        chat.append(htok(rendered, add_special_tokens=False).input_ids)
    return code + chat


@pytest.fixture(scope="module")
def smol_refs(hf_gguf, smol_prompts):
    hf, _ = hf_gguf
    return hf_greedy(hf, smol_prompts, NEW)


def test_ssd_greedy_equals_transformers(ray_local, smol_pair, hf_gguf, smol_prompts, smol_refs):
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec
    from cluster.launch.engine import RayEngine

    hf, _ = hf_gguf
    # Fixed K = 4 (adaptive speculation would soon stop drafting with this drafter): every round
    # drafts, and nearly every draft is rejected and corrected.
    # float32, as the reference (the config's dtype: auto is bfloat16 on CPUs that have it:
    # tests/test_bf16.py checks that against transformers in bfloat16)
    cfg = load_config("configs/smol-cpu.yaml", {"models.draft.path": "demo:smol/cheap", "speculation.adaptive": False,
                                                "engine.max_seq_len": 256, "engine.max_batch": 6,
                                                "models.target.dtype": "float32", "models.draft.dtype": "float32"})
    spec = engine_spec(cfg)
    assert spec.mode == "ssd" and spec.k == 4
    engine = RayEngine(spec).start()
    coord = Coordinator(engine, None, max_queue=64)
    try:
        handles = [coord.submit(GenerateArgs(list(p), NEW)) for p in smol_prompts]
        finals = [h.result() for h in handles]
    finally:
        coord.stop()
        engine.stop()
    assert len(smol_prompts) >= 12
    exact = 0
    for p, h, r in zip(smol_prompts, handles, smol_refs):
        same = assert_matches_or_near_tie(hf, p, h.tokens, r)
        if not same:
            print(f"near tie on prompt {hf_gguf[1].decode(p[-20:])!r}")
        exact += same
    assert exact >= len(smol_prompts) - 2, f"only {exact}/{len(smol_prompts)} identical"
    stats = SpecStats.total(f.stats for f in finals)
    assert stats.drafts > 0  # speculation really ran (and was really checked)


def test_openai_client_gets_exact_logprobs_and_a_prefix_hit_from_the_real_pair(serve_tiny, smol_pair, hf_gguf):
    """SmolLM2-135M-Instruct served in SSD (its cheap drafter, K = 4 every round, float32) and
    called with the openai client: two chat requests share a system prompt. The second is a
    prefix-cache hit; both carry logprobs, and those equal transformers' teacher-forced
    log-probabilities of the very tokens served (a wrong cached block or a wrong verify row would
    move them). The same pair's json_schema answer: tests/test_structured_api.py."""
    from tests.conftest import openai_client
    from tests.test_logprobs import grpc_logprobs, teacher_forced

    hf, htok = hf_gguf
    server, client = serve_tiny({"models.target.path": "demo:smol/target", "models.draft.path": "demo:smol/cheap",
                                 "models.target.dtype": "float32", "models.draft.dtype": "float32",
                                 "speculation.adaptive": False, "engine.max_seq_len": 512, "http.model_name": "smol"})
    system = "You answer questions about numbers, briefly and exactly, in one sentence. " * 5
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("Is 97 a prime number?", "Is 91 a prime number?")]
    try:
        with openai_client(server) as oai:
            served = [oai.chat.completions.create(model="smol", messages=m, max_tokens=16, temperature=0, logprobs=True,
                                                  top_logprobs=2, extra_body={"ignore_eos": True}) for m in chats]
        ids = [grpc_logprobs(client, m, 0, max_new_tokens=16, ignore_eos=True)[0] for m in chats]
        stats = served[0].model_extra["metrics"]["speculative_decoding"]
    finally:
        client.close()
        server.stop(grace_s=1)
    assert served[0].usage.prompt_tokens_details.cached_tokens == 0
    assert served[1].usage.prompt_tokens_details.cached_tokens >= 64   # the shared system prompt's full blocks
    assert stats["drafts"] > 0                                        # speculation really ran
    for m, r, out in zip(chats, served, ids):
        prompt = htok(htok.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False).input_ids
        content = r.choices[0].logprobs.content
        assert [bytes(c.bytes) for c in content] == [server.tok.token_bytes(t) for t in out]   # the same tokens
        ref = teacher_forced(hf, prompt, out)
        for i, (t, c) in enumerate(zip(out, content)):
            assert abs(c.logprob - float(ref[i, t])) <= 1e-3, (i, c.logprob, float(ref[i, t]))
            torch.testing.assert_close(torch.tensor([a.logprob for a in c.top_logprobs]), ref[i].topk(2).values,
                                       atol=1e-3, rtol=0)
