"""Chat messages -> prompt text, with the checkpoint's own chat template.

The template is the Jinja2 source in tokenizer_config.json (`chat_template`), rendered the way
Hugging Face's `apply_chat_template` renders it: a sandboxed environment with trim_blocks and
lstrip_blocks, the helpers templates call (`raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII), the tokenizer's special tokens as variables, and `add_generation_prompt` so the text
ends where the assistant's answer begins. The rendered text is then encoded without adding
special tokens (the template wrote them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """The messages cannot be rendered; the message says why."""


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special: dict[str, str]          # bos_token, eos_token, ... as the template sees them

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTemplate | None:
        """The template in `path`/tokenizer_config.json (or chat_template.jinja), or None."""
        path = Path(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        jinja_file = path / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        if not source:
            return None
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = cfg.get(key)
            if isinstance(v, dict):  # AddedToken serialised as a dict
                v = v.get("content")
            if isinstance(v, str):
                special[key] = v
        return cls(source, special)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        check_messages(messages)
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **self.special)
        except jinja2.TemplateError as e:
            raise ChatError(f"the chat template rejected the messages: {e}") from None


def check_messages(messages: list[dict[str, str]]) -> None:
    if not messages:
        raise ChatError("messages is empty")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not m.get("content"):
            raise ChatError(f"messages[{i}].content is empty")


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # Templates come with checkpoints: untrusted code, hence the sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"the checkpoint's chat template does not parse: {e}") from None
