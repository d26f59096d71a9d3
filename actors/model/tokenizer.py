"""Tokenizer: a Hugging Face `tokenizer.json` through the `tokenizers` package.

`IncrementalDecoder` turns a growing list of ids into text deltas for streaming. Byte-level BPE
can end a chunk in the middle of a multi-byte UTF-8 character (decoded as U+FFFD); such a tail
is held back until the next tokens complete it.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders

from actors.model.chat import ChatError, ChatTemplate, check_messages


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        f = path / "tokenizer.json" if path.is_dir() else path
        if not f.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        self._tok = _HFTokenizer.from_file(str(f))
        self.eos_token_ids: tuple[int, ...] = ()
        cfg = f.parent / "config.json"
        if cfg.is_file():
            eos = json.loads(cfg.read_text()).get("eos_token_id")
            self.eos_token_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        self.chat_template = ChatTemplate.from_dir(f.parent)
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for a chat: the checkpoint's template with the assistant's turn opened."""
        check_messages(messages)
        if self.chat_template is None:
            raise ChatError("this model's checkpoint has no chat template: send a prompt instead of messages")
        return self.encode(self.chat_template.render(messages, add_generation_prompt=True))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): exact for byte-level BPE,
        where a token may hold part of a UTF-8 character; else the token decoded on its own."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:   # an added token written as plain text
                return piece.encode()
        return self._tok.decode([token_id], skip_special_tokens=False).encode()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable bytes stand for themselves,
    the rest for the code points from 256 up, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    return {c: b for b, c in chars.items()}


_UNICODE_TO_BYTE = _byte_level_alphabet()


def vocab_mismatch(target: Tokenizer, draft: Tokenizer) -> str | None:
    """Why a drafter's tokenizer cannot serve this target, or None when they agree.

    Drafts are token ids the verifier checks against its own vocabulary, so every id must mean
    the same string on both sides. Models may carry extra embedding rows (padding to a multiple
    of 64 or 128); those are not in either tokenizer and do not count.
    """
    a, b = target._tok.get_vocab(with_added_tokens=True), draft._tok.get_vocab(with_added_tokens=True)
    if len(a) != len(b):
        return f"the draft tokenizer has {len(b)} tokens, the target's {len(a)}"
    by_id = {i: t for t, i in a.items()}
    for tok, i in sorted(b.items(), key=lambda kv: kv[1]):
        if by_id.get(i) != tok:
            return f"token id {i} is {tok!r} for the drafter but {by_id.get(i)!r} for the target"
    return None


class IncrementalDecoder:
    """Streams text deltas, decoding only a short window of ids per push (not the whole sequence).

    The window starts a few tokens before the new ones (`prefix`..`read`): decoders that depend on
    the neighbouring token (a leading space, byte fallback) see the same context both times, and
    the delta is what the new ids add to it.
    """

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0    # start of the decode window
        self.read = 0      # ids before this index have been turned into text

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly completed text (may be empty)."""
        self.ids += ids
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a multi-byte character still incomplete
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
