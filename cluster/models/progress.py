"""Progress of a long model build: a tqdm bar where stderr is a terminal, and a log line every
`every_s` seconds (and one at the end) either way, so a build piped to a file or run in CI shows
how far it is (`make bench`'s ~20-minute bench-pair build used to go silent after its tokenizer).
"""
from __future__ import annotations

import logging
import time

from tqdm import tqdm


class Progress:
    """Iterate it (or call `update`); `set_postfix` adds figures such as the loss to both."""

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 log: logging.Logger | None = None, every_s: float = 30.0):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.log = log or logging.getLogger(__name__)
        self.every_s = every_s
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=2, disable=None,
                        dynamic_ncols=True)   # None: a bar on a terminal only; the log lines are for the rest
        self.n = 0
        self.postfix: dict = {}
        self.t0 = self._last = time.perf_counter()

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def set_postfix(self, refresh: bool = True, **kw) -> None:
        self.postfix = kw
        if self.bar is not None:
            self.bar.set_postfix(refresh=refresh, **kw)

    def close(self) -> None:
        if self.bar is None:
            return
        self.bar.close()
        self.bar = None
        self._line(time.perf_counter(), done=True)

    def _line(self, now: float, done: bool = False) -> None:
        dt = max(now - self.t0, 1e-9)
        rate = self.n / dt
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = f", ~{(self.total - self.n) / rate:.0f}s left" if self.total and rate > 0 and not done else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        self.log.info("%s: %s %d%s %s%s in %.0fs, %.1f %s/s%s%s", self.desc, "done" if done else "at", self.n, of,
                      self.unit, pct, dt, rate, self.unit, eta, extra)
