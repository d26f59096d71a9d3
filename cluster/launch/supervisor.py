"""Keep the engine whole: restart a dead drafter, rebuild the pair when the verifier dies.

A dead drafter (any one of several: each is watched and restarted on its own, with a backoff of
its own) costs speed, never correctness: the verifier notices the broken data plane,
keeps decoding without drafts, and joins the replacement between two steps. Restarting only asks
for the replacement; it may wait minutes for Ray to place it (its node is gone until one with the
same resources joins), and it joins from a later check once it has started, so this loop never
waits for it and keeps watching the verifier meanwhile. A dead verifier
takes the sequences' state with it: the coordinator ends every open stream with an error
(UNAVAILABLE to clients) or, with several replicas, moves the requests that have not streamed
yet to another replica; the replica counts as down (health goes NOT_SERVING when no replica is
left up), a fresh pair is started, the replica is up again, and new requests succeed.

One supervisor watches one replica (cluster/serving/replicas.py): a rebuild blocks only its own loop.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)
QUICK_DEATH_S = 60.0   # a replacement drafter dying sooner than this after its restart backs the next one off
MAX_BACKOFF_S = 60.0   # the longest wait between two restarts of a drafter that keeps dying


class Supervisor:
    def __init__(self, replica, period_s: float = 0.5):
        self.replica = replica   # .engine, .coord, .new_engine(), .set_up(bool), .refresh_load()
        self.period_s = period_s
        self.drafter_restarts = 0
        self.verifier_rebuilds = 0
        self.checks = 0                # completed checks: the loop is alive and not stuck
        self._last_restart: dict[int, float] = {}   # per drafter: when it was last restarted
        self._backoff_s: dict[int, float] = {}      # per drafter: the wait before its next restart
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outrider-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.check()
            except Exception as e:  # the supervisor must outlive whatever it supervises
                log.exception("supervisor check failed: %s", e)
            self.checks += 1

    def check(self) -> None:
        engine = self.replica.engine
        if engine is None or self._stop.is_set():
            return
        if not engine.verifier_alive():
            self._rebuild(engine)
            return
        for i in range(engine.spec.draft_replicas if engine.spec.speculative else 0):
            if not engine.check_drafter(i):
                self._restart_drafter(engine, i)
        self.replica.refresh_load()

    def _restart_drafter(self, engine, i: int) -> None:
        """A drafter that keeps dying soon after its restart (it cannot start where Ray puts it: a
        checkpoint missing on that node, a bad device) is retried less and less often."""
        now = time.monotonic()
        last, backoff = self._last_restart.get(i, -QUICK_DEATH_S), self._backoff_s.get(i, 0.0)
        if now < last + backoff:
            return
        quick = now - last < QUICK_DEATH_S
        self._backoff_s[i] = min(max(1.0, 2 * backoff), MAX_BACKOFF_S) if quick else 0.0
        self._last_restart[i] = now
        log.warning("drafter %d died: restarting it (its sequences decode without drafts meanwhile)", i)
        engine.restart_drafter(i)
        self.drafter_restarts += 1

    def _rebuild(self, dead) -> None:
        r = self.replica
        t0 = time.perf_counter()
        log.error("replica %d: verifier died: failing (or moving) open requests and rebuilding the engine", r.index)
        r.set_up(False)
        r.coord.fail_all("the verifier process died; retry the request")
        dead.stop(timeout_s=5)
        engine = r.new_engine()
        r.engine = engine
        r.coord.replace_engine(engine)
        r.set_up(True)
        self.verifier_rebuilds += 1
        log.info("replica %d: engine rebuilt in %.1fs; serving again", r.index, time.perf_counter() - t0)
