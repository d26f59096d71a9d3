"""Which replica serves a request: prefix affinity first, else the least loaded.

A pure decision over load snapshots (no Ray, no threads, no clock), so its choices are unit
tested directly; the replica set (cluster/serving/replicas.py) holds the lock and feeds it live numbers.

- Least loaded: the fewest requests in flight at the replica (its queue depth: in the verifier's
  batch or waiting for it), then the lowest KV use (in tenths), then the replica least recently chosen (so
  an idle set spreads sequential requests rather than piling them on replica 0).
- Prefix affinity: the router remembers which replica served the first blocks of recent prompts
  (hashes of prompt[:b], prompt[:2b], ... for block length b). A prompt that shares such a
  prefix goes to the replica that served the longest one, which holds those positions warm
  (and, with prefix caching, their KV blocks), unless that replica is down or overloaded: its
  batch is full (depth >= max_batch: the request would only wait there) or its KV use is at
  or above `kv_high`. Then the least loaded one serves it and becomes the prefix's new home.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

AFFINITY = "affinity"
LEAST_LOADED = "least_loaded"


@dataclass(frozen=True)
class Load:
    """One replica as the router sees it."""
    up: bool = True
    depth: int = 0            # requests in flight there (running + waiting)
    kv_usage: float = 0.0     # fraction of its KV blocks in use, 0..1
    max_batch: int = 8        # sequences its verifier batches at once


@dataclass
class Router:
    block: int = 16               # prefix granularity (tokens); prompts shorter have no affinity
    max_blocks: int = 32          # the longest prefix remembered: block * max_blocks tokens
    capacity: int = 8192          # prefixes remembered (least recently used dropped first)
    kv_high: float = 0.9          # KV use at which a replica counts as overloaded
    _homes: OrderedDict = field(default_factory=OrderedDict)   # prefix hash -> replica
    _last_chosen: dict = field(default_factory=dict)            # replica -> decision number
    _n: int = 0

    def prefixes(self, prompt: list[int]) -> list[int]:
        """Hashes of the prompt's block-aligned prefixes, shortest first."""
        n = min(len(prompt) // self.block, self.max_blocks)
        return [hash(tuple(prompt[:(i + 1) * self.block])) for i in range(n)]

    def overloaded(self, load: Load) -> bool:
        return load.depth >= load.max_batch or load.kv_usage >= self.kv_high

    def choose(self, prompt: list[int], loads: list[Load], exclude: frozenset[int] = frozenset()
               ) -> tuple[int, str] | None:
        """(replica, reason) for a prompt; None when no replica is up (outside `exclude`)."""
        live = [i for i, load in enumerate(loads) if load.up and i not in exclude]
        if not live:
            return None
        for h in reversed(self.prefixes(prompt)):
            home = self._homes.get(h)
            if home is None:
                continue
            if home in live and not self.overloaded(loads[home]):
                return home, AFFINITY
            break   # the longest remembered prefix's home is busy: balance instead
        # KV use counts in tenths: a few blocks' difference (or a reading a moment old) is noise
        # beside spreading requests over idle replicas.
        best = min(live, key=lambda i: (loads[i].depth, int(loads[i].kv_usage * 10), self._last_chosen.get(i, -1), i))
        return best, LEAST_LOADED

    def record(self, prompt: list[int], replica: int) -> None:
        """The prompt went to `replica`: its prefixes now live there."""
        self._n += 1
        self._last_chosen[replica] = self._n
        for h in self.prefixes(prompt):
            self._homes[h] = replica
            self._homes.move_to_end(h)
        while len(self._homes) > self.capacity:
            self._homes.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica lost its state (rebuilt): nothing is warm there any more."""
        for h in [h for h, r in self._homes.items() if r == replica]:
            del self._homes[h]
