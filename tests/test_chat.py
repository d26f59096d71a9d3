"""Chat messages: rendered exactly as transformers' apply_chat_template renders them, and bad
chats refused by the real server with INVALID_ARGUMENT naming the cause."""
from __future__ import annotations

import json
import re
import shutil

import grpc
import pytest

from actors.model.chat import ChatError
from actors.model.tokenizer import Tokenizer

# ChatML with a default system turn (the SmolLM2-Instruct family's shape).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# bos_token as a variable, whitespace control, raise_exception on a bad role order, tojson.
STRICT = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('roles must alternate user/assistant') }}{%- endif -%}\n"
    "  [{{ message['role'] | upper }}] {{ message['content'] | trim }} {{ {'n': loop.index} | tojson }}\n"
    "{%- endfor -%}{%- if add_generation_prompt %}\n[ASSISTANT]{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "Write a Python function that tells whether a number is prime."}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "def f(x): ?"},
     {"role": "assistant", "content": "return x"}, {"role": "user", "content": "  and naïve café ☕  "}],
]


def _with_template(tiny_pair, tmp_path, template: str, name: str):
    """A copy of the tiny target whose tokenizer_config.json carries a chat template."""
    d = tmp_path / name
    shutil.copytree(tiny_pair / "target", d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.mark.parametrize("template", [CHATML, STRICT], ids=["chatml", "strict"])
def test_rendered_ids_equal_transformers(tiny_pair, tmp_path, template):
    from transformers import AutoTokenizer

    d = _with_template(tiny_pair, tmp_path, template, "chat")
    ours, theirs = Tokenizer(d), AutoTokenizer.from_pretrained(d)
    for chat in CHATS:
        if template is STRICT and chat[0]["role"] == "system":
            with pytest.raises(ChatError, match="alternate"):
                ours.encode_chat(chat)
            continue
        want = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.encode_chat(chat) == list(want)


def test_bad_chats_are_chat_errors(tiny_pair, tmp_path):
    tok = Tokenizer(_with_template(tiny_pair, tmp_path, CHATML, "chat"))
    for chat, why in [([], "empty"), ([{"role": "robot", "content": "hi"}], "role"),
                      ([{"role": "user", "content": ""}], "content is empty")]:
        with pytest.raises(ChatError, match=why):
            tok.encode_chat(chat)
    with pytest.raises(ChatError, match="no chat template"):
        Tokenizer(tiny_pair / "target").encode_chat([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def chat_server(serve_tiny, tiny_pair, tmp_path_factory):
    d = _with_template(tiny_pair, tmp_path_factory.mktemp("chat"), CHATML, "target")
    server, client = serve_tiny({"models.target.path": str(d)})
    yield server, client, Tokenizer(d)
    client.close()
    server.stop(grace_s=1)


def test_server_chat_equals_rendered_prompt(chat_server):
    _, client, tok = chat_server
    chat = CHATS[1]
    ids, final = client.generate_ids(chat, max_new_tokens=16)
    ref_ids, ref_final = client.generate_ids(tok.encode_chat(chat), max_new_tokens=16)
    assert ids == ref_ids and len(ids) == final.usage.completion_tokens == 16
    assert final.usage.prompt_tokens == len(tok.encode_chat(chat)) == ref_final.usage.prompt_tokens


@pytest.mark.parametrize("chat,why", [
    ([{"role": "robot", "content": "hi"}], "messages\\[0\\].role"),
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": ""}], "messages\\[1\\].content is empty"),
])
def test_server_refuses_bad_chat(chat_server, chat, why):
    _, client, _ = chat_server
    with pytest.raises(grpc.RpcError) as e:
        client.generate_ids(chat, max_new_tokens=4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(why, e.value.details())


def test_server_without_template_refuses_chat(serve_tiny):
    server, client = serve_tiny()
    try:
        with pytest.raises(grpc.RpcError) as e:
            client.generate_ids([{"role": "user", "content": "hi"}], max_new_tokens=4)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no chat template" in e.value.details()
    finally:
        client.close()
        server.stop(grace_s=1)
