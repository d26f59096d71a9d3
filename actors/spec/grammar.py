"""Structured outputs: a grammar that constrains which tokens a sequence may emit (xgrammar).

A request's constraint is a `GrammarSpec`: a JSON schema, any JSON object, a regex or an EBNF
grammar (a choice of strings becomes EBNF). The verifier keeps one `Matcher` per constrained
sequence, holding the grammar's state after the committed tokens. At each position it verifies,
the target's logits are masked with the grammar's token bitmask *before* the acceptance rule:
position i of a draft is masked with the matcher advanced through draft tokens 0..i-1. The
masked logits are the target's distribution under the constraint, so the rule of verify.py is
exact for it (greedy: its argmax; sampling: p is the masked distribution), and speculation
changes nothing against constrained decoding by the target alone. After the round the matcher
rolls back to the accepted prefix and takes the emitted token.

xgrammar's TokenizerInfo is built from the checkpoint's tokenizer.json (the `tokenizers`
package; transformers is not needed): the vocabulary by id, and its encoding (byte-level BPE,
byte fallback, raw) detected from the serialized tokenizer as xgrammar's own Hugging Face path
does. The model's vocabulary may be larger than the tokenizer's (padded embeddings): the mask
covers the model's and never allows the padding.

xgrammar is imported on first use: it loads transformers, seconds that a server without
constrained requests should not pay.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json_object", "regex", "ebnf")
MAX_GRAMMAR_CHARS = 1 << 16     # a schema, regex or grammar's text
CACHE_SIZE = 64                 # compiled grammars kept per engine (one per distinct spec)
# JSON may hold whitespace between its tokens (pretty-printed or not), but at most this many
# characters in a row: unbounded, a model can emit nothing but spaces until max_tokens.
MAX_JSON_WHITESPACE = 16
JSON_OBJECT_SCHEMA = '{"type": "object"}'   # OpenAI's json_object: any JSON object


class GrammarError(ValueError):
    """The constraint cannot be parsed; the message says why (for a 400 / INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class GrammarSpec:
    kind: str          # one of KINDS
    text: str = ""     # the schema (JSON text), regex or EBNF; empty for json_object

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GrammarError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if len(self.text) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"the {self.kind} is {len(self.text)} characters; the limit is {MAX_GRAMMAR_CHARS}")
        if self.kind != "json_object" and not self.text:
            raise GrammarError(f"the {self.kind} is empty")


def choice_spec(options: list[str]) -> GrammarSpec:
    """Exactly one of `options`, as EBNF (JSON string escapes are EBNF's)."""
    if not options or not all(isinstance(o, str) and o for o in options):
        raise GrammarError("choice must be a non-empty list of non-empty strings")
    return GrammarSpec("ebnf", "root ::= " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))


def _xgr():
    import xgrammar

    return xgrammar


def _clean(err: Exception) -> str:
    """xgrammar's message without its '[time] /path/file.cc:line: ' prefix."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(err).strip())


_JSON_OPTIONS = {"any_whitespace": True, "max_whitespace_cnt": MAX_JSON_WHITESPACE}


def _schema_text(spec: GrammarSpec) -> str:
    try:
        schema = json.loads(spec.text)
    except ValueError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    return spec.text


def check(spec: GrammarSpec) -> None:
    """Parse the constraint without a vocabulary (the front end's check): GrammarError if bad."""
    xgr = _xgr()
    try:
        if spec.kind == "json_schema":
            xgr.Grammar.from_json_schema(_schema_text(spec), **_JSON_OPTIONS)
        elif spec.kind == "regex":
            xgr.Grammar.from_regex(spec.text)
        elif spec.kind == "ebnf":
            xgr.Grammar.from_ebnf(spec.text)
    except GrammarError:
        raise
    except Exception as e:   # xgrammar raises RuntimeError / ValueError with the parser's message
        raise GrammarError(f"invalid {spec.kind}: {_clean(e)}") from None


def tokenizer_info(tokenizer_dir: str | Path, vocab_size: int, stop_ids: tuple[int, ...]):
    """xgrammar's view of a checkpoint's tokenizer.json, for a model with `vocab_size` logits."""
    from tokenizers import Tokenizer

    xgr = _xgr()
    path = Path(tokenizer_dir)
    tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * max(vocab_size, max(vocab.values()) + 1)
    for piece, i in vocab.items():
        encoded[i] = piece
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xgr.TokenizerInfo(encoded[:vocab_size], meta["vocab_type"], vocab_size=vocab_size,
                             stop_token_ids=list(stop_ids) or None, add_prefix_space=meta["add_prefix_space"])


class Grammars:
    """Compiles specs for one vocabulary, once per distinct spec (a small LRU), and makes matchers.
    Thread-safe: a request's grammar is compiled when it is submitted, off the engine's loop."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_ids: tuple[int, ...], max_rollback: int):
        xgr = _xgr()
        self.vocab_size, self.max_rollback, self.stop_ids = vocab_size, max_rollback, stop_ids
        self._compiler = xgr.GrammarCompiler(tokenizer_info(tokenizer_dir, vocab_size, stop_ids), max_threads=1,
                                             cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, object] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec):
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            if spec.kind in ("json_schema", "json_object"):
                text = JSON_OBJECT_SCHEMA if spec.kind == "json_object" else _schema_text(spec)
                compiled = self._compiler.compile_json_schema(text, **_JSON_OPTIONS)
            elif spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.text)
            else:
                compiled = self._compiler.compile_grammar(spec.text)
        except GrammarError:
            raise
        except Exception as e:
            raise GrammarError(f"invalid {spec.kind}: {_clean(e)}") from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> Matcher:
        return Matcher(_xgr().GrammarMatcher(self.compile(spec), max_rollback_tokens=self.max_rollback),
                       self.vocab_size, self.max_rollback, self.stop_ids)


class Matcher:
    """One sequence's grammar state, at its committed tokens between rounds."""

    def __init__(self, matcher, vocab_size: int, max_rows: int, stop_ids: tuple[int, ...] = ()):
        self.m, self.vocab_size, self.stop_ids = matcher, vocab_size, stop_ids
        self._bits = _xgr().allocate_token_bitmask(max_rows, vocab_size)

    def fork(self) -> Matcher:
        """An independent copy at the same state (a pre-drafted branch's own matcher)."""
        other = Matcher.__new__(Matcher)
        other.m, other.vocab_size, other.stop_ids = self.m.fork(), self.vocab_size, self.stop_ids
        other._bits = self._bits.clone()
        return other

    @property
    def terminated(self) -> bool:
        return self.m.is_terminated()

    def mask_rows(self, rows: torch.Tensor, draft: list[int]) -> int:
        """Mask rows [len(draft) + 1, V] of logits in place: row i with the state after draft[:i].
        The matcher advances through the draft while the grammar accepts it and stays there; the
        number of draft tokens it took is returned, for `settle`. A draft token the grammar refuses
        has probability 0 in its row's masked distribution, so it is rejected and no later row
        decides anything: those rows are left as they are."""
        n = 0
        for i in range(len(draft) + 1):
            if self.m.is_terminated():   # a drafted stop token ended it: the request ends there too
                return n
            self.m.fill_next_token_bitmask(self._bits, i)
            apply_mask(rows[i], self._bits[i], self.stop_ids)
            if i == len(draft) or not self.m.accept_token(int(draft[i])):
                return n
            n += 1
        return n

    def settle(self, advanced: int, accepted: list[int]) -> bool:
        """After a round: back from `advanced` draft tokens to the first len(accepted) - 1 of them
        (the accepted prefix), then take the emitted token; False if the grammar refuses it."""
        keep = len(accepted) - 1
        if advanced > keep:
            self.m.rollback(advanced - keep)
        elif advanced < keep or self.m.is_terminated():
            # the accepted drafts ran past a drafted stop token (rows after it are not masked):
            # the request ends at that token, and the grammar with it
            return self.m.is_terminated()
        return self.m.accept_token(int(accepted[-1]))

    def advance(self, tokens: list[int]) -> bool:
        """Take committed tokens; False if the grammar refuses one or has ended before it."""
        return all(not self.m.is_terminated() and self.m.accept_token(int(t)) for t in tokens)


@torch.inference_mode()   # the forward's logits are inference tensors: written in place only in this mode
def apply_mask(row: torch.Tensor, bits: torch.Tensor, stop_ids: tuple[int, ...] = ()) -> None:
    """Set the logits of tokens the bitmask forbids to -inf, in place, on the row's device (the
    bitmask is int32 words, bit j of word w allowing token 32w + j). A grammar that allows no
    token at all (a regex no text matches) leaves the stop tokens: the request ends there rather
    than sampling from a row without a finite logit."""
    allowed = ((bits[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:row.shape[-1]].bool()
    if stop_ids and not allowed.any():
        allowed[list(stop_ids)] = True
    row.masked_fill_(~allowed.to(row.device, non_blocking=True), float("-inf"))
