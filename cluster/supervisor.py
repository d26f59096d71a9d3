"""Keep the engine whole: restart a dead drafter, rebuild the pair when the verifier dies.

A dead drafter costs speed, never correctness: the verifier notices the broken data plane,
keeps decoding without drafts, and joins the replacement between two steps. A dead verifier
takes the sequences' state with it: the coordinator ends every open stream with an error
(UNAVAILABLE to clients), health goes NOT_SERVING, a fresh pair is started, health returns to
SERVING, and new requests succeed.
"""
from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, server, period_s: float = 0.5):
        self.server = server
        self.period_s = period_s
        self.drafter_restarts = 0
        self.verifier_rebuilds = 0
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

    def check(self) -> None:
        engine = self.server.engine
        if engine is None or self._stop.is_set():
            return
        if not engine.verifier_alive():
            self._rebuild(engine)
        elif engine.spec.speculative and not engine.check_drafter():
            log.warning("drafter died: restarting it (the verifier decodes without drafts meanwhile)")
            engine.restart_drafter()
            self.drafter_restarts += 1

    def _rebuild(self, dead) -> None:
        server = self.server
        t0 = time.perf_counter()
        log.error("verifier died: failing open requests and rebuilding the engine")
        server.set_health(False)
        server.coord.fail_all("the verifier process died; retry the request")
        dead.stop(timeout_s=5)
        engine = server.new_engine()
        server.engine = engine
        server.coord.replace_engine(engine)
        server.set_health(True)
        self.verifier_rebuilds += 1
        log.info("engine rebuilt in %.1fs; serving again", time.perf_counter() - t0)
