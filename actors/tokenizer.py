"""Tokenizer: a Hugging Face `tokenizer.json` through the `tokenizers` package.

`IncrementalDecoder` turns a growing list of ids into text deltas for streaming. Byte-level BPE
can end a chunk in the middle of a multi-byte UTF-8 character (decoded as U+FFFD); such a tail
is held back until the next tokens complete it.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


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

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


class IncrementalDecoder:
    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, ids: list[int]) -> str:
        """Add ids; return the newly completed text (may be empty)."""
        self.ids += ids
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        # Text can only change at its tail as tokens merge into characters; emit the new suffix.
        if not text.startswith(self.emitted):
            common = 0
            while common < min(len(text), len(self.emitted)) and text[common] == self.emitted[common]:
                common += 1
            self.emitted = text[:common]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
