"""OpenAI function calling where the call itself is forced: `tool_choice` "required" or a named
function becomes a JSON-schema constraint on the answer (structured outputs, exact under
speculation), and the answer is returned as `tool_calls`.

- a named function ({"type": "function", "function": {"name": N}}): the answer is N's arguments,
  constrained by N's `parameters` schema (as vLLM does);
- "required": the answer is a JSON array of one or more calls [{"name", "parameters"}], each
  constrained by its own function's schema (vLLM's shape); exactly one with
  `parallel_tool_calls: false`;
- "none": the tools are ignored, the answer is text;
- "auto" (the default when tools are given): the model would have to choose between text and a
  call in its own format, which needs a chat template that renders tools and a parser for what
  the model writes; outrider has neither, so this is a 400 saying so.

The tools are not rendered into the prompt (the templates served here have no tools section):
the schema alone decides what the call looks like.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from cluster.serving.api.structured import FormatError

# OpenAI: a function without `parameters` has an empty parameter list
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCalls:
    schema: dict              # what the answer must match
    name: str | None          # the forced function; None: "required" (names come with the calls)

    def calls(self, text: str) -> list[dict] | None:
        """OpenAI's tool_calls for the answer, or None if it is no complete call (cut short)."""
        try:
            doc = json.loads(text)
        except ValueError:
            return None
        pairs = [(self.name, doc)] if self.name is not None else [(c["name"], c["parameters"]) for c in doc]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": n, "arguments": json.dumps(args, ensure_ascii=False)}} for n, args in pairs]


def tool_calls_of(tools: Any, choice: Any, parallel: bool = True) -> ToolCalls | None:
    """The forced call the body asks for; None when there is none (no tools, or tool_choice none)."""
    if choice in (None, "none") and tools is None:
        return None
    functions = _functions(tools)
    if choice == "none":
        return None
    if choice in (None, "auto"):
        raise FormatError("tool_choice 'auto' (the default with tools) needs a chat template that renders tools "
                          "and a parser for the model's own call format; this server forces calls only: set "
                          "tool_choice to 'required' or {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if choice == "required":
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                  "properties": {"name": {"const": n}, "parameters": p}} for n, p in functions.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return ToolCalls(schema if parallel else {**schema, "maxItems": 1}, None)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise FormatError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', "
                          f"'function': {{'name': ...}}}}, got {choice!r}", "tool_choice")
    if name not in functions:
        raise FormatError(f"tool_choice names {name!r}, which is not among the tools: {sorted(functions)}",
                          "tool_choice")
    return ToolCalls(functions[name], name)


def _functions(tools: Any) -> dict[str, dict]:
    """name -> parameters schema of each function tool."""
    if not isinstance(tools, list) or not tools:
        raise FormatError("tools must be a non-empty list of {'type': 'function', 'function': {...}}", "tools")
    out = {}
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise FormatError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., "
                              "'parameters': {...}}}}", "tools")
        params = f.get("parameters", NO_PARAMETERS)
        if not isinstance(params, dict):
            raise FormatError(f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
        out[f["name"]] = params
    return out
