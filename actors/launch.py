"""Run the engine without Ray: the verifier in this process, the drafter in a child process.

Same classes, same data plane as the Ray deployment — this is how a machine without Ray (a bare
GPU box, a profiler session) runs outrider, and it proves the actors depend on nothing but
torch. `LocalEngine` exposes the submit/abort/poll/metrics calls the coordinator uses.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading

from actors.channel import free_port
from actors.spec import EngineSpec
from actors.verifier import Verifier

log = logging.getLogger(__name__)


def _drafter_main(spec: EngineSpec, addr: str, port: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drafter %(levelname)s %(message)s")
    from actors.drafter import Drafter

    d = Drafter(spec)
    d.connect(addr, port)
    d.run()


class LocalEngine:
    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.verifier = Verifier(spec)
        self.proc: mp.Process | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LocalEngine:
        if self.spec.speculative:
            port = self.spec.master_port or free_port()
            # spawn, not fork: a forked child would inherit torch's thread pools and CUDA state.
            self.proc = mp.get_context("spawn").Process(
                target=_drafter_main, args=(self.spec, "127.0.0.1", port), daemon=True)
            self.proc.start()
            self.verifier.connect("127.0.0.1", port)
        self._thread = threading.Thread(target=self.verifier.run, name="outrider-verifier", daemon=True)
        self._thread.start()
        return self

    def submit(self, req) -> None:
        self.verifier.submit(req)

    def abort(self, request_id: int) -> None:
        self.verifier.abort(request_id)

    def poll(self, timeout: float = 0.05, linger_s: float = 0.0) -> list[dict]:
        return self.verifier.poll(timeout, linger_s)

    def metrics(self) -> dict:
        return self.verifier.metrics()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.verifier.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.proc is not None:
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
