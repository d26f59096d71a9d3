"""Stop conditions shared by every decoding mode.

Token-level stops (EOS, stop token ids, max_new_tokens) are checked on ids. Stop strings need
text: the generated ids are decoded and the earliest occurrence of any stop string ends the
generation; the returned text excludes the stop string (OpenAI semantics) while the token list
keeps the token that completed it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StopCriteria:
    max_new_tokens: int
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty")

    def check_tokens(self, generated: list[int], start: int = 0) -> tuple[int, str] | None:
        """Scan generated[start:] for a token-level stop. Returns (tokens to keep, reason)."""
        for i in range(start, len(generated)):
            if generated[i] in self.stop_token_ids:
                return i + 1, "stop"
            if i + 1 >= self.max_new_tokens:
                return i + 1, "length"
        return None

    def check_text(self, text: str) -> int | None:
        """Index where the earliest stop string starts in `text`, or None."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None
