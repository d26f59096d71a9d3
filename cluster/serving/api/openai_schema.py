"""OpenAI request bodies -> outrider GenerateRequests, and OpenAI's error shape.

A body becomes the same `outrider.v1.GenerateRequest` a gRPC client would send, so both front
ends share one validation path (cluster/serving/validate.py) and one set of limits.
Structured outputs (response_format, vLLM's structured_outputs and guided_*) are read in
cluster/serving/api/structured.py, forced function calls (tools, tool_choice) in
cluster/serving/api/tools.py. Parameters outrider cannot honour (n > 1, penalties, ...) are
refused with a 400 naming them, never silently ignored; fields OpenAI's own servers would
ignore are ignored here too.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from actors.spec.logprobs import MAX_TOP_LOGPROBS
from cluster.rpc.outrider.v1 import outrider_pb2 as pb
from cluster.serving.api.structured import FormatError, structured_of
from cluster.serving.api.tools import ToolCalls, tool_calls_of


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")   # as OpenAI ignores fields it does not know
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)       # OpenAI's default: sampling at T = 1
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # extras, as vLLM accepts them
    top_k: int = Field(0, ge=0, le=2**31)
    ignore_eos: bool = False
    disable_speculation: bool = False
    k: int | None = Field(None, ge=0)
    # completions: logprobs = n (0..20); chat: logprobs = true, top_logprobs = n (checked in logprobs_of)
    logprobs: Any = None
    top_logprobs: Any = None
    # structured outputs (cluster/serving/api/structured.py): OpenAI's, then vLLM's extras
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    # chat only, with tool_choice "required" or a named function (api/tools.py)
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    # refused unless at their no-op value
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    functions: Any = None
    function_call: Any = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]


class ChatBody(_Common):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def parse(cls: type[_Common], data: Any) -> _Common:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        body = cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param=param) from None
    _refuse_unsupported(body)
    return body


def _refuse_unsupported(b: _Common) -> None:
    refused = [
        ("n", b.n != 1, "only n = 1 is supported"),
        ("best_of", b.best_of not in (None, 1), "only best_of = 1 is supported"),
        ("presence_penalty", b.presence_penalty != 0, "presence_penalty is not supported"),
        ("frequency_penalty", b.frequency_penalty != 0, "frequency_penalty is not supported"),
        ("logit_bias", bool(b.logit_bias), "logit_bias is not supported"),
        ("tools", b.tools is not None and not isinstance(b, ChatBody), "tools are a chat parameter"),
        ("functions", b.functions is not None, "functions are not supported"),
        ("function_call", b.function_call is not None, "function_call is not supported"),
        ("echo", b.echo, "echo is not supported"),
        ("suffix", b.suffix is not None, "suffix is not supported"),
    ]
    for param, bad, why in refused:
        if bad:
            raise APIError(400, why, param=param, code="unsupported_parameter")


def _count(value: Any, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be an integer from 0 to {MAX_TOP_LOGPROBS} (the most likely tokens "
                            f"reported per position), got {value!r}", param=param)
    return value


def logprobs_of(b: _Common) -> int | None:
    """How many alternatives per token the body asks for; None: no logprobs."""
    if not isinstance(b, ChatBody):
        if b.top_logprobs is not None:
            raise APIError(400, "top_logprobs is a chat parameter; completions take logprobs: <0..20>",
                           param="top_logprobs")
        return None if b.logprobs is None or b.logprobs is False else _count(b.logprobs, "logprobs")
    if b.logprobs not in (None, True, False):
        raise APIError(400, f"logprobs must be true or false for chat (the count is top_logprobs), "
                            f"got {b.logprobs!r}", param="logprobs")
    if b.top_logprobs is not None:
        n = _count(b.top_logprobs, "top_logprobs")
        if not b.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return n
    return 0 if b.logprobs else None


def forced_call(b: _Common) -> ToolCalls | None:
    """The function call a chat body forces with tool_choice (cluster/serving/api/tools.py)."""
    if not isinstance(b, ChatBody):
        return None
    try:
        return tool_calls_of(b.tools, b.tool_choice, b.parallel_tool_calls is not False)
    except FormatError as e:
        raise APIError(400, str(e), param=e.param) from None


def to_request(b: _Common, call: ToolCalls | None = None) -> pb.GenerateRequest:
    """The GenerateRequest this body asks for (validated further by cluster/serving/validate.py);
    a forced function `call` constrains the answer to its schema."""
    req = pb.GenerateRequest(temperature=b.temperature, top_k=b.top_k, top_p=b.top_p,
                             ignore_eos=b.ignore_eos, disable_speculation=b.disable_speculation)
    if isinstance(b, ChatBody):
        req.messages.messages.extend(_chat_message(i, m) for i, m in enumerate(b.messages))
        max_tokens = b.max_completion_tokens or b.max_tokens
    else:
        _set_prompt(req, b.prompt)
        max_tokens = b.max_tokens
    if max_tokens is not None:
        req.max_new_tokens = min(max_tokens, 2**32 - 1)
    if b.seed is not None:
        if b.seed >= 2**63:
            raise APIError(400, f"seed must be < 2^63, got {b.seed}", param="seed")
        req.seed = b.seed
    if b.k is not None:
        req.k = min(b.k, 2**32 - 1)
    n_logprobs = logprobs_of(b)
    if n_logprobs is not None:
        req.logprobs = n_logprobs
    if b.stop is not None:
        req.stop.extend([b.stop] if isinstance(b.stop, str) else b.stop)
    try:
        structured = structured_of(b)
    except FormatError as e:
        raise APIError(400, str(e), param=e.param) from None
    if call is not None:
        if structured is not None:
            raise APIError(400, "tool_choice forces a JSON schema already: no other structured-output constraint "
                                "with it", param="tool_choice")
        structured = pb.StructuredOutput(json_schema=json.dumps(call.schema))
    if structured is not None:
        req.structured.CopyFrom(structured)
    return req


def _set_prompt(req: pb.GenerateRequest, prompt) -> None:
    if isinstance(prompt, str):
        req.prompt = prompt
        return
    if prompt and isinstance(prompt[0], (str, list)):  # a batch of prompts
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request is supported, got {len(prompt)}", param="prompt")
        _set_prompt(req, prompt[0])
        return
    if any(t < 0 or t >= 2**32 for t in prompt):
        raise APIError(400, "token ids in prompt must be non-negative", param="prompt")
    req.prompt_ids.ids.extend(prompt)


def _chat_message(i: int, m: dict[str, Any]) -> pb.ChatMessage:
    role, content = m.get("role"), m.get("content")
    if role == "developer":  # OpenAI's newer name for the system turn
        role = "system"
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                               param=f"messages.{i}.content")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(role, str) or not isinstance(content, str):
        raise APIError(400, f"messages[{i}] needs a string role and string content", param=f"messages.{i}")
    return pb.ChatMessage(role=role, content=content)


# Which OpenAI parameter a validation message (cluster/serving/validate.py, in gRPC field names) is about.
PARAMS = {"max_new_tokens": "max_tokens", "prompt_ids": "prompt", "prompt": "prompt", "messages": "messages",
          "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop", "k": "k",
          "logprobs": "logprobs", "structured": "response_format",
          "request_id": None}


def param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0].split("[", 1)[0].rstrip(":")
    return PARAMS.get(head)
