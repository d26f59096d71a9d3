"""OpenAI's and vLLM's ways of asking for structured outputs -> one `StructuredOutput`.

OpenAI: `response_format` {"type": "json_schema", "json_schema": {"name", "schema", "strict"}},
{"type": "json_object"} or {"type": "text"} (no constraint). vLLM's extras: `structured_outputs`
{"json" | "regex" | "choice" | "grammar" | "json_object": ...}, and its older `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar`. At most one constraint per request. The
constraint itself (a schema that is no schema, a regex that does not parse) is checked with the
gRPC request's fields (cluster/serving/validate.py), so both front ends give the same message.
"""
from __future__ import annotations

import json
from typing import Any

from cluster.rpc.outrider.v1 import outrider_pb2 as pb

RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# structured_outputs' keys -> StructuredOutput's fields
STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                   "json_object": "json_object"}
GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


class FormatError(ValueError):
    """A structured-output parameter is malformed (answered as a 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param



def structured_of(b) -> pb.StructuredOutput | None:
    """The body's one constraint, or None for free text."""
    found = []   # (parameter, StructuredOutput field, value)
    rf = _response_format(b.response_format)
    if rf is not None:
        found.append(("response_format", *rf))
    so = b.structured_outputs
    if so is not None:
        if not isinstance(so, dict):
            raise FormatError("structured_outputs must be an object", "structured_outputs")
        unknown = sorted(set(so) - set(STRUCTURED_KEYS))
        if unknown:
            raise FormatError(f"structured_outputs: unsupported keys {unknown}; supported: "
                                f"{', '.join(STRUCTURED_KEYS)}", "structured_outputs")
        found += [("structured_outputs", STRUCTURED_KEYS[k], v) for k, v in so.items() if v not in (None, False)]
    found += [(name, field, getattr(b, name)) for name, field in GUIDED.items() if getattr(b, name) is not None]
    if len(found) > 1:
        raise FormatError(f"one structured-output constraint per request, got {len(found)}: "
                            f"{', '.join(p for p, _, _ in found)}", found[1][0])
    if not found:
        return None
    param, field, value = found[0]
    return _message(param, field, value)


def _response_format(rf: Any) -> tuple[str, Any] | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in RESPONSE_FORMATS:
        got = rf.get("type") if isinstance(rf, dict) else rf
        raise FormatError(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, got {got!r}",
                       param="response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return "json_object", True
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
        raise FormatError("response_format json_schema needs json_schema.schema, a JSON Schema object",
                       param="response_format")
    return "json_schema", js["schema"]


def _message(param: str, field: str, value: Any) -> pb.StructuredOutput:
    if field == "json_schema":
        if isinstance(value, str):   # vLLM accepts the schema as JSON text too
            return pb.StructuredOutput(json_schema=value)
        if not isinstance(value, dict):
            raise FormatError(f"{param}: the JSON schema must be an object", param)
        return pb.StructuredOutput(json_schema=json.dumps(value))
    if field == "json_object":
        return pb.StructuredOutput(json_object=value is True or _fail(param, "json_object must be true"))
    if field == "choice":
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            _fail(param, "choice must be a list of strings")
        return pb.StructuredOutput(choice=pb.Choices(options=value))
    if not isinstance(value, str):
        _fail(param, f"the {field} must be a string")
    return pb.StructuredOutput(**{field: value})


def _fail(param: str, why: str):
    raise FormatError(f"{param}: {why}", param)
