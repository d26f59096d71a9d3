"""Turn a GenerateRequest into engine arguments, or say precisely what is wrong with it.

Everything a client controls is checked here, before it reaches the coordinator, so a bad field
becomes INVALID_ARGUMENT with a message naming it, never an error deep inside the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from actors.model.chat import ChatError
from actors.spec.grammar import GrammarError, GrammarSpec, check, choice_spec
from actors.spec.logprobs import MAX_TOP_LOGPROBS
from actors.spec.sampling import SamplingParams
from actors.model.tokenizer import Tokenizer
from cluster.serving.coordinator import GenerateArgs

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_STOP_TOKENS = 64
MAX_REQUEST_ID = 128
MAX_SEED = 2**63 - 1      # seeds travel as int64 on the data plane
MAX_PROMPT_CHARS = 1 << 20


class InvalidRequest(ValueError):
    """A request field is out of range; the message names the field."""


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    max_new_tokens_limit: int
    default_max_new_tokens: int
    max_k: int | None = None     # speculation.k: the largest per-request k (None: no speculation to tune)


def to_generate_args(req, tok: Tokenizer, limits: Limits, deadline_s: float | None = None) -> GenerateArgs:
    """`req` is an outrider.v1.GenerateRequest."""
    prompt_ids = _prompt(req, tok, limits)
    n_prompt = len(prompt_ids)
    room = limits.max_seq_len - n_prompt
    if room <= 0:
        raise InvalidRequest(f"prompt is {n_prompt} tokens; the context holds {limits.max_seq_len} "
                             "including the new tokens")
    if req.HasField("max_new_tokens"):
        max_new = req.max_new_tokens
        if max_new <= 0:
            raise InvalidRequest(f"max_new_tokens must be positive, got {max_new}")
        if max_new > limits.max_new_tokens_limit:
            raise InvalidRequest(f"max_new_tokens {max_new} exceeds the server limit {limits.max_new_tokens_limit}")
        if max_new > room:
            raise InvalidRequest(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new}) exceeds the context "
                                 f"of {limits.max_seq_len} tokens")
    else:
        max_new = min(limits.default_max_new_tokens, room)
    return GenerateArgs(prompt_ids, max_new, _params(req), _stops(req), _stop_ids(req, limits),
                        speculate=not req.disable_speculation, ignore_eos=req.ignore_eos, deadline_s=deadline_s,
                        request_id=_request_id(req), k=_k(req, limits), logprobs=_logprobs(req),
                        grammar=_grammar(req))


def _prompt(req, tok: Tokenizer, limits: Limits) -> list[int]:
    which = req.WhichOneof("input")
    if which == "prompt":
        if not req.prompt:
            raise InvalidRequest("prompt is empty")
        if len(req.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"prompt is {len(req.prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        ids = tok.encode(req.prompt)
        if not ids:
            raise InvalidRequest("prompt encodes to zero tokens")
        return ids
    if which == "prompt_ids":
        ids = list(req.prompt_ids.ids)
        if not ids:
            raise InvalidRequest("prompt_ids is empty")
        bad = [t for t in ids if t >= limits.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_ids must be < vocab size {limits.vocab_size}, got {bad[:3]}")
        return ids
    if which == "messages":
        messages = [{"role": m.role, "content": m.content} for m in req.messages.messages]
        if sum(len(m["content"]) for m in messages) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"messages hold more than {MAX_PROMPT_CHARS} characters")
        try:
            return tok.encode_chat(messages)
        except ChatError as e:
            raise InvalidRequest(str(e)) from None
    raise InvalidRequest("prompt is empty: set prompt, prompt_ids or messages")


def _params(req) -> SamplingParams:
    t = req.temperature
    if not math.isfinite(t) or t < 0:
        raise InvalidRequest(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    seed = req.seed if req.HasField("seed") else None
    if seed is not None and seed > MAX_SEED:
        raise InvalidRequest(f"seed must be < 2^63, got {seed}")
    # float32 on the wire: widen exactly what the client sent
    return SamplingParams(float(t), int(req.top_k), float(top_p), seed)


def _stops(req) -> tuple[str, ...]:
    stops = list(req.stop)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for s in stops:
        if not s:
            raise InvalidRequest("stop strings must not be empty")
        if len(s) > MAX_STOP_LEN:
            raise InvalidRequest(f"stop strings are at most {MAX_STOP_LEN} characters, got {len(s)}")
    return tuple(stops)


def _stop_ids(req, limits: Limits) -> tuple[int, ...]:
    ids = list(req.stop_token_ids)
    if len(ids) > MAX_STOP_TOKENS:
        raise InvalidRequest(f"at most {MAX_STOP_TOKENS} stop_token_ids, got {len(ids)}")
    bad = [t for t in ids if t >= limits.vocab_size]
    if bad:
        raise InvalidRequest(f"stop_token_ids must be < vocab size {limits.vocab_size}, got {bad[:3]}")
    return tuple(ids)


def _k(req, limits: Limits) -> int | None:
    """The request's own draft length (0 = no speculation), at most the server's speculation.k."""
    if not req.HasField("k"):
        return None
    if limits.max_k is None:
        if req.k:
            raise InvalidRequest(f"k must be 0 here: this server does not speculate (got {req.k})")
        return 0
    if req.k > limits.max_k:
        raise InvalidRequest(f"k must be at most the server's speculation.k = {limits.max_k}, got {req.k}")
    return req.k


def _logprobs(req) -> int | None:
    """How many alternatives to report beside each token's own logprob; None: no logprobs."""
    if not req.HasField("logprobs"):
        return None
    if req.logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"logprobs must be at most {MAX_TOP_LOGPROBS} (the most likely tokens reported per "
                             f"position), got {req.logprobs}")
    return req.logprobs


def _grammar(req) -> GrammarSpec | None:
    """The structured-output constraint, parsed here so that a bad one is the client's error."""
    if not req.HasField("structured"):
        return None
    st = req.structured
    which = st.WhichOneof("kind")
    try:
        if which is None:
            raise GrammarError("set one of json_schema, json_object, regex, grammar, choice")
        if which == "json_object":
            if not st.json_object:
                raise GrammarError("json_object must be true when set")
            spec = GrammarSpec("json_object")
        elif which == "choice":
            spec = choice_spec(list(st.choice.options))
        else:
            spec = GrammarSpec("ebnf" if which == "grammar" else which, getattr(st, which))
        check(spec)
    except GrammarError as e:
        raise InvalidRequest(f"structured: {e}") from None
    return spec


def _request_id(req) -> str:
    rid = req.request_id
    if len(rid) > MAX_REQUEST_ID:
        raise InvalidRequest(f"request_id is at most {MAX_REQUEST_ID} characters, got {len(rid)}")
    if rid and not rid.isprintable():
        raise InvalidRequest("request_id must be printable text")
    return rid
