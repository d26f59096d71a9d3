"""OpenAI's logprobs objects from the coordinator's per-token entries (cluster/serving/coordinator.py
Chunk.logprobs: (logprob, [(id, logprob), ...]) per token, defined in actors/spec/logprobs.py).

Completions (legacy shape): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, where
each top_logprobs entry is a {token text: logprob} dict of the top n plus the emitted token (so
up to n + 1 entries, as OpenAI documents). Chat: {"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}, ...]}], "refusal": None}, exactly the top n.

A token's text is its bytes decoded on their own; a byte-level token that holds part of a UTF-8
character reads as U+FFFD there, and `bytes` (chat) carries its exact bytes.
"""
from __future__ import annotations

import codecs

from actors.model.tokenizer import Tokenizer


class LogprobsShape:
    """Per request: turns chunks' entries into OpenAI's objects; for completions it keeps the
    running text offset, so streamed chunks continue where the last one ended."""

    def __init__(self, tok: Tokenizer, chat: bool):
        self.tok, self.chat = tok, chat
        self._chars = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._offset = 0   # characters of the completion before the next token

    def _text(self, token_id: int) -> tuple[str, bytes]:
        b = self.tok.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), b

    def of(self, token_ids: list[int], entries: list) -> dict:
        return self._chat(token_ids, entries) if self.chat else self._completion(token_ids, entries)

    def _chat(self, token_ids: list[int], entries: list) -> dict:
        content = []
        for t, (lp, top) in zip(token_ids, entries):
            text, b = self._text(t)
            alts = []
            for i, v in top:
                at, ab = self._text(i)
                alts.append({"token": at, "logprob": v, "bytes": list(ab)})
            content.append({"token": text, "logprob": lp, "bytes": list(b), "top_logprobs": alts})
        return {"content": content, "refusal": None}

    def _completion(self, token_ids: list[int], entries: list) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, (lp, top) in zip(token_ids, entries):
            text, b = self._text(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            alts = {self._text(i)[0]: v for i, v in top}
            alts.setdefault(text, lp)   # the emitted token is always there (n + 1 at most)
            out["top_logprobs"].append(alts)
            out["text_offset"].append(self._offset)
            self._offset += len(self._chars.decode(b))   # a split character counts where it completes
        return out
