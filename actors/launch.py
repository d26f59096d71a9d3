"""Run the engine without Ray: the verifier in this process, the drafter in a child process.

Same classes, same data plane as the Ray deployment — this is how a machine without Ray (a bare
GPU box, a profiler session) runs outrider, and it proves the actors depend on nothing but
torch. `LocalEngine` exposes the calls the coordinator, the supervisor and the bench use
(submit/abort/poll/metrics, verifier_alive/check_drafter/restart_drafter), so `cluster.launcher:
local` serves and benchmarks the same way as Ray.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import threading
import time

from actors.model.buckets import PRECOMPILE_S
from actors.protocol.ports import reserve_port, take_reserved
from actors.engine_spec import EngineSpec
from actors.model.tp.group import close_group
from actors.model.tp.worker import end_workers, spawn_workers
from actors.verifier import Verifier

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 5.0
READY_S = PRECOMPILE_S   # a drafter's start-up: loading its model and, with engine.compile,
                         # precompiling its bucket shapes (minutes on a GPU); the data plane forms after it
READY = "ready"    # the child's first message on the stats pipe


def _serve_stats(drafter, conn) -> None:
    """Answer the parent's metrics() calls beside the drafter's loop (a daemon thread)."""
    try:
        while conn.recv() is not None:
            conn.send(drafter.stats())
    except (EOFError, OSError):   # the parent went away
        pass


def _drafter_main(spec: EngineSpec, addr: str, port: int, conn=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drafter %(levelname)s %(message)s")
    from actors.drafter import Drafter

    d = Drafter(spec)
    if conn is not None:   # built (and precompiled): the parent forms the data plane now, within its timeout
        conn.send(READY)
        threading.Thread(target=_serve_stats, args=(d, conn), name="outrider-drafter-stats", daemon=True).start()
    d.connect(addr, port)
    d.run()


def same_gpu(a: str, b: str) -> bool:
    """Whether two device strings of one process name the same GPU ("cuda" is "cuda:0")."""
    def index(d: str) -> str | None:
        return None if not d.startswith("cuda") else (d.split(":", 1)[1] if ":" in d else "0")

    return index(a) is not None and index(a) == index(b)


class LocalEngine:
    def __init__(self, spec: EngineSpec):
        if spec.speculative and spec.draft_replicas > 1:
            raise ValueError(f"draft_replicas={spec.draft_replicas}: several drafters are placed by Ray; "
                             "the local launcher runs one")
        if spec.speculative and spec.backend == "auto" and same_gpu(spec.target_device, spec.draft_device):
            # NCCL refuses two ranks on one GPU; the data plane's few ints go over gloo instead.
            spec = dataclasses.replace(spec, backend="gloo")
        self.spec = spec
        # Tensor-parallel ranks 1..N-1 (actors/model/tp/) load their shards while the verifier loads rank 0's.
        self.tp_port, self.tp_procs = spawn_workers(spec) if spec.tensor_parallel_size > 1 else (0, [])
        self.proc: mp.Process | None = None
        try:
            self.verifier = Verifier(spec)
        except BaseException:
            self._abandon()
            raise
        self._stats = None                  # our end of the drafter's stats pipe
        self._ready = threading.Event()     # the current drafter child said READY
        self._stats_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> LocalEngine:
        try:
            if self.tp_procs:
                self.verifier.join_tp("127.0.0.1", self.tp_port)
            if self.spec.speculative:
                port = self._spawn_drafter()
                self._await_ready()
                self.verifier.connect("127.0.0.1", port)
        except BaseException:
            self._abandon()
            raise
        self._thread = threading.Thread(target=self._run, name="outrider-verifier", daemon=True)
        self._thread.start()
        return self

    def _abandon(self) -> None:
        """A bring-up that failed: end the processes it started. Nothing else would (the caller
        never gets this engine to stop), and each holds a model: a TP worker would keep its shard
        until its rendezvous timed out, minutes later."""
        for p in [*self.tp_procs, *([self.proc] if self.proc is not None else [])]:
            p.kill()
            p.join()
        if self.tp_procs:
            close_group()   # rank 0's side, if it formed (a later engine in this process forms its own)
            sock = take_reserved(self.tp_port)   # or the port it never took over
            if sock is not None:
                sock.close()

    def _spawn_drafter(self) -> int:
        port = self.spec.master_port or reserve_port()   # bound here; the verifier's connect takes it over
        ours, theirs = mp.Pipe()
        # spawn, not fork: a forked child would inherit torch's thread pools and CUDA state.
        self.proc = mp.get_context("spawn").Process(
            target=_drafter_main, args=(self.spec, "127.0.0.1", port, theirs), daemon=True)
        self.proc.start()
        theirs.close()   # the child holds its own copy: once it dies, our end reads EOF at once
        with self._stats_lock:
            if self._stats is not None:
                self._stats.close()
            self._stats = ours
            self._ready = threading.Event()
        return port

    def _await_ready(self, timeout_s: float = READY_S) -> None:
        """Wait for the drafter child to say it is built, as RayEngine waits for the drafter actor:
        the data plane's join then waits only for the rendezvous, not for a load or a compile."""
        end = time.monotonic() + timeout_s
        while not self._ready.is_set():
            with self._stats_lock:
                if self._stats.poll(0.2):
                    try:
                        msg = self._stats.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg != READY:
                        raise RuntimeError(f"the drafter process ended before it was ready (exit code "
                                           f"{self.proc.exitcode})")
                    self._ready.set()
                    return
            if not self.proc.is_alive():
                raise RuntimeError(f"the drafter process exited with code {self.proc.exitcode} before it was ready")
            if time.monotonic() > end:
                raise TimeoutError(f"the drafter process was not ready within {timeout_s:.0f}s")

    def _run(self) -> None:
        try:
            self.verifier.run()
        except BaseException as e:   # reported through verifier_alive(), as a dead Ray actor is
            log.exception("the verifier loop died")
            self._error = e

    # -- the coordinator's calls -------------------------------------------------------------
    def submit(self, req) -> None:
        self.verifier.submit(req)

    def abort(self, request_id: int) -> None:
        self.verifier.abort(request_id)

    def poll(self, timeout: float = 0.05, linger_s: float = 0.0) -> list[dict]:
        events = self.verifier.poll(timeout, linger_s)
        if not events and self._error is not None:
            # The loop died: no event will ever come. Raising lets the coordinator fail the open
            # requests at once (as a dead Ray actor's poll does) instead of leaving them waiting.
            raise RuntimeError(f"the verifier loop died: {type(self._error).__name__}: {self._error}")
        return events

    def metrics(self) -> dict:
        m = self.verifier.metrics()
        if self.spec.speculative:
            m["drafter"] = self._drafter_stats()
        return m

    def _drafter_stats(self) -> dict | None:
        with self._stats_lock:
            try:
                if not self._ready.is_set():
                    return None   # still loading or compiling: it answers nothing yet
                self._stats.send(True)
                if self._stats.poll(STATS_TIMEOUT_S):
                    return self._stats.recv()
            except (EOFError, OSError):
                pass
            return None   # a dead or stuck drafter must not break metrics

    # -- the supervisor's calls --------------------------------------------------------------
    def verifier_alive(self) -> bool:
        """False once the verifier's loop has ended with an error, or a tensor-parallel rank has died."""
        return self._thread is not None and self._error is None and all(p.is_alive() for p in self.tp_procs)

    def check_drafter(self, i: int = 0) -> bool:   # one drafter: several need Ray (cluster/config.py)
        return self.proc is not None and (self.proc.is_alive() or self.proc.exitcode == 0)

    def restart_drafter(self, i: int = 0) -> None:
        """Replace a dead drafter. The verifier keeps serving (without drafts) while the new
        process starts; it joins it in the background and swaps it in between two steps."""
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
        port = self._spawn_drafter()
        threading.Thread(target=self._join_when_ready, args=(port,), name="outrider-drafter-ready",
                         daemon=True).start()

    def _join_when_ready(self, port: int) -> None:
        try:
            self._await_ready()
        except (RuntimeError, TimeoutError) as e:   # the supervisor sees the dead child and restarts it
            log.warning("restarted drafter: %s", e)
            return
        self.verifier.reconnect("127.0.0.1", port)

    def drafter_pid(self, i: int = 0) -> int:
        return self.proc.pid

    def tp_pids(self) -> list[int]:
        return [p.pid for p in self.tp_procs]

    def stop(self, timeout_s: float = 10.0) -> None:
        self.verifier.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
        end_workers(self.tp_procs, timeout_s)
        if self.proc is not None:
            self.proc.join(timeout_s)
            if self.proc.is_alive():
                self.proc.kill()
        if self._stats is not None:
            self._stats.close()
