"""A record of the adaptive policy's inputs and decisions, round by round, and its replay.

Set OUTRIDER_ADAPTIVE_TRACE=<prefix> in the environment of an engine (Ray actors inherit the
driver's) and every Controller appends JSON lines to <prefix>.<pid>.jsonl: each measurement it
is fed (verify time by shape, draft and pre-speculation times, lookups, verified drafts, sequences
added and removed) and each decision with what it was made from (acceptance by position, the
cost model, the expected tokens per millisecond of every K, the K chosen and the K drafted after
probing). `replay` feeds the measurements of such a record to a fresh Controller and returns its
decisions, so a policy change can be judged on a real engine's inputs without running one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "OUTRIDER_ADAPTIVE_TRACE"


class TraceWriter:
    def __init__(self, path: str | Path, meta: dict):
        self.path = Path(path)
        self._lines: list[str] = []
        self.write({"ev": "start", **meta})

    def write(self, rec: dict) -> None:
        self._lines.append(json.dumps(rec, separators=(",", ":")))
        if len(self._lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            with open(self.path, "a") as f:
                f.write("\n".join(self._lines) + "\n")
            self._lines = []


def writer_from_env(meta: dict) -> TraceWriter | None:
    prefix = os.environ.get(ENV)
    if not prefix:
        return None
    return TraceWriter(f"{prefix}.{os.getpid()}.jsonl", meta)


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# What replay feeds the controller for each recorded measurement ("decide" is handled apart).
_FEED = {
    "add": lambda c, e: c.add(e["sid"], e.get("fixed")),
    "remove": lambda c, e: c.remove(e["sid"]),
    "verify": lambda c, e: c.observe_verify(e["n"], e["s"]),
    "draft": lambda c, e: c.observe_draft(e["steps"], e["draft_s"], e["transport_s"], e.get("catch_up_s", 0.0)),
    "prespec": lambda c, e: c.observe_prespec(e["steps"], e["s"], e["t_verify"], e.get("n", 1),
                                              e.get("catch_up_s", 0.0)),
    "lookup": lambda c, e: c.observe_lookup(e["hit"]),
    "table_wait": lambda c, e: c.observe_table_wait(e["s"]),
    "step": lambda c, e: c.observe_round_time(e["ks"], e["s"]),
    "round": lambda c, e: c.observe_round(e["sid"], e["n_draft"], e["accepted"]),
}


def replay(events: list[dict], controller) -> list[tuple[dict, dict]]:
    """Feed a recorded engine's measurements to `controller` in their order; returns, for every
    recorded decision, (what the record chose, what `controller` chooses at the same point)."""
    c = controller
    out = []
    for e in events:
        ev = e["ev"]
        if ev == "decide":
            got = c.decide([int(s) for s in e["ks"]])
            out.append(({int(s): k for s, k in e["ks"].items()}, got))
        elif ev in _FEED:
            _FEED[ev](c, e)
    return out
