"""Bring the engine up on Ray: the verifier and its drafters as actors on separate devices.

Ray is the control plane only: it places the processes (one placement-group bundle each, so
each gets its own GPU, or its own CPU core on a laptop), starts, health-checks and restarts them.
The per-round traffic goes over the torch.distributed channel the verifier forms with each
drafter, on a port of its own (models.draft.replicas may ask for several drafters). The
coordinator lives in the serving process (the Ray driver), which holds no Ray resources (the
`num_cpus=0` role): it submits and aborts through Ray calls, and committed tokens come back over
a TCP stream the verify loop writes (actors/protocol/events.py), read here and long-polled locally
by the coordinator.
"""
from __future__ import annotations

import logging
import os
import secrets
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from actors.model.buckets import PRECOMPILE_S
from actors.protocol.events import EventReader, EventStreamClosed
from actors.engine_spec import EngineSpec
from cluster.launch.ray_actors import DrafterActor, TPWorkerActor, VerifierActor
from cluster.launch.placement import actor_options, drafter_bundle, missing_resources, placement_bundles
from cluster.serving.metrics import numbers_added

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0          # a quick call to a live actor (the supervisor's thread makes some)
DRAFTER_WAIT_REPORT_S = 30.0   # how often a drafter still waiting for a node is reported


class DrafterSlot:
    """One drafter of the engine: its actor in its bundle, its start, its join and its restart."""

    def __init__(self, index: int):
        self.index = index
        self.actor = None
        self.ready = None   # its ready() call: resolves once Ray placed and built it
        self.run = None     # its join_and_run(): resolves when its loop ends; None until it joins
        self.since = 0.0    # when the current drafter was asked for
        self.said = 0.0     # when a drafter still waiting for a node was last reported


class RayEngine:
    """Verifier + drafter actors and their data plane. `submit/abort/poll/metrics` mirror the
    Verifier's own methods, so the coordinator works the same on Ray or in plain processes."""

    def __init__(self, spec: EngineSpec, placement_strategy: str = "PACK", ready_timeout_s: float = 300.0):
        if spec.draft is None and spec.mode != "ar":
            raise ValueError("a draft model is required for sd and ssd")
        self.spec = spec
        self.placement_strategy = placement_strategy
        self.ready_timeout_s = ready_timeout_s
        # Waits that include building a role (loading, and with engine.compile precompiling its
        # bucket shapes: minutes on a GPU, actors/model/runner.py) get the compile on top.
        self.build_timeout_s = ready_timeout_s + (PRECOMPILE_S if spec.compile else 0.0)
        self.verifier = None
        self.drafters = [DrafterSlot(i) for i in range(spec.draft_replicas if spec.speculative else 0)]
        self.pg = None
        self.bundles = placement_bundles(spec)
        self.rendezvous: tuple[str, int] | None = None   # a data plane's address and port, last formed
        self.events: EventReader | None = None
        self._events_token = secrets.token_hex(16)
        self._runs: list = []
        self.tp_workers: list = []   # the target's ranks 1..N-1 (actors/model/tp/), in bundles 1..N-1
        self._tp_runs: list = []     # their join_and_run() calls: one resolves only if its loop ends

    @property
    def drafter(self):
        """The first drafter's actor (the only one unless models.draft.replicas > 1)."""
        return self.drafters[0].actor if self.drafters else None

    # -- bring-up ------------------------------------------------------------------------------
    def start(self) -> RayEngine:
        s = self.spec
        self.pg = placement_group(self.bundles, strategy=self.placement_strategy)
        self._wait_placed()
        self.verifier = ray.remote(VerifierActor).options(
            **actor_options(self.bundles[0], self.pg, 0, max_concurrency=16, name=None, max_restarts=0)).remote(s)
        if s.tensor_parallel_size > 1:
            self._start_tp_ranks()
        for d in self.drafters:   # built side by side; each joins on a port of its own
            self._new_drafter(d)
        for d in self.drafters:
            ray.get(d.ready, timeout=self.build_timeout_s)
            addr, port = self._data_plane(timeout_s=self.build_timeout_s)
            v = self.verifier.connect.remote(addr, port, d.index)   # the loop is not running yet: form it directly
            d.run = d.actor.join_and_run.remote(addr, port)
            ray.get(v, timeout=self.build_timeout_s)
            log.info("engine up: mode=%s k=%d, drafter %d's data plane on %s:%d", s.mode, s.k, d.index, addr, port)
        self._runs.append(self.verifier.run.remote())
        ray.get(self.verifier.ready.remote(), timeout=self.build_timeout_s)
        self._open_events()
        return self

    def _start_tp_ranks(self) -> None:
        """Ranks 1..N-1 join rank 0 (the verifier) on its node address and a port it reserved."""
        t = self.build_timeout_s   # rank 0 precompiles across the ranks once they join (engine.compile)
        addr = ray.get(self.verifier.node_ip.remote(), timeout=t)
        port = ray.get(self.verifier.free_port.remote(), timeout=t)
        worker = ray.remote(TPWorkerActor)
        self.tp_workers = [worker.options(**actor_options(self.bundles[r], self.pg, r, max_concurrency=2))
                           .remote(self.spec, r) for r in range(1, self.spec.tensor_parallel_size)]
        self._tp_runs = [w.join_and_run.remote(addr, port) for w in self.tp_workers]
        joined = self.verifier.join_tp.remote(addr, port)
        first, _ = ray.wait([joined, *self._tp_runs], num_returns=1, timeout=t)
        ray.get(first or joined, timeout=t)   # a rank that failed to start raises here, not after rank 0's wait
        log.info("tensor-parallel target: %d ranks, group on %s:%d", self.spec.tensor_parallel_size, addr, port)

    def tp_pids(self) -> list[int]:
        return ray.get([w.pid.remote() for w in self.tp_workers], timeout=CALL_TIMEOUT_S)

    def _wait_placed(self) -> None:
        missing = missing_resources(self.bundles, ray.cluster_resources())
        if missing:
            log.warning("no node of the Ray cluster declares %s (models.target.resources / models.draft.resources); "
                        "waiting up to %.0fs for nodes that do", missing, self.ready_timeout_s)
        if not self.pg.wait(timeout_seconds=self.ready_timeout_s):
            raise RuntimeError(f"the Ray cluster cannot place {self.bundles} ({self.placement_strategy}) within "
                               f"{self.ready_timeout_s:.0f}s: not enough CPUs/GPUs/custom resources on its nodes"
                               + (f" (none declares {missing})" if missing else "") + "; see `ray status`")

    def _open_events(self, timeout_s: float | None = None) -> None:
        """Committed tokens come over a stream of their own (actors/protocol/events.py), not Ray calls.
        Reopened after a break, it continues after the last event the old stream delivered."""
        timeout_s = timeout_s or self.ready_timeout_s
        addr = ray.get(self.verifier.node_ip.remote(), timeout=timeout_s)
        local = addr == ray.util.get_node_ip_address()   # then nothing outside this host can connect
        port = ray.get(self.verifier.open_events.remote(self._events_token, local), timeout=timeout_s)
        addr = "127.0.0.1" if local else addr
        after = self.events.last_n if self.events is not None else 0
        self.events = EventReader(addr, port, self._events_token, timeout_s, after=after)

    def _data_plane(self, timeout_s: float | None = None) -> tuple[str, int]:
        """The verifier's node address and a port reserved on it: the drafter's rendezvous."""
        timeout_s = timeout_s or self.ready_timeout_s
        addr = ray.get(self.verifier.node_ip.remote(), timeout=timeout_s)
        self.rendezvous = (addr, ray.get(self.verifier.free_port.remote(), timeout=timeout_s))
        return self.rendezvous

    def _new_drafter(self, d: DrafterSlot) -> None:
        """Ask Ray for drafter `d` in its bundle. Returns at once: the actor starts when its bundle
        is placed, which after losing its node waits for a node with the resources."""
        i = drafter_bundle(self.spec, d.index)
        d.actor = ray.remote(DrafterActor).options(
            **actor_options(self.bundles[i], self.pg, i, max_concurrency=2)).remote(self.spec.for_drafter(d.index))
        d.ready = d.actor.ready.remote()
        d.run = None
        d.since = d.said = time.monotonic()

    def restart_drafter(self, i: int = 0) -> None:
        """Replace dead drafter i without waiting for it: the verifier keeps serving (its sequences
        without drafts), and the replacement joins from check_drafter() once Ray has started it."""
        d = self.drafters[i]
        if d.actor is not None:
            ray.kill(d.actor, no_restart=True)
        self._new_drafter(d)

    def _join_when_started(self, d: DrafterSlot) -> bool:
        """A replacement drafter joins the running loop once it is up; False if it failed to start."""
        ready, _ = ray.wait([d.ready], timeout=0)
        if not ready:
            now = time.monotonic()
            if now - d.said >= DRAFTER_WAIT_REPORT_S:
                d.said = now
                log.warning("drafter %d has waited %.0fs for Ray to place it (bundle %s); its sequences go "
                            "without speculation meanwhile", d.index, now - d.since,
                            self.bundles[drafter_bundle(self.spec, d.index)])
            return True
        try:
            ray.get(ready[0])
        except Exception as e:
            log.error("the replacement drafter %d did not start: %s", d.index, e)
            return False
        addr, port = self._data_plane(timeout_s=CALL_TIMEOUT_S)
        self.verifier.reconnect.remote(addr, port, d.index)   # formed in the background, swapped in between steps
        d.run = d.actor.join_and_run.remote(addr, port)
        log.info("drafter %d started after %.1fs; joining the data plane on %s:%d", d.index,
                 time.monotonic() - d.since, addr, port)
        return True

    # -- the verifier's API, through Ray -------------------------------------------------------
    def submit(self, req) -> None:
        ray.get(self.verifier.submit.remote(req))

    def abort(self, request_id: int) -> None:
        self.verifier.abort.remote(request_id)

    def poll(self, timeout: float = 0.05, linger_s: float = 0.0) -> list[dict]:
        try:
            return self.events.poll(timeout, linger_s)
        except EventStreamClosed:
            # A live verifier re-sends what this host missed on a new stream; a dead one raises here.
            log.warning("the event stream broke; reopening it")
            self._open_events(timeout_s=10.0)
            return []

    def metrics(self) -> dict:
        m = ray.get(self.verifier.metrics.remote())
        if self.drafters:
            stats = [self._drafter_stats(d) for d in self.drafters]
            m["drafter"] = stats[0] if len(stats) == 1 else numbers_added([x for x in stats if x]) or None
            m["drafters"] = stats
        return m

    @staticmethod
    def _drafter_stats(d: DrafterSlot) -> dict | None:
        """None while a replacement waits to be placed, or for a dead one (it must not break metrics)."""
        if d.run is None:
            return None
        try:
            return ray.get(d.actor.stats.remote(), timeout=5)
        except Exception:
            return None

    def drafter_pid(self, i: int = 0) -> int:
        return ray.get(self.drafters[i].actor.pid.remote())

    def verifier_alive(self) -> bool:
        """False once the verifier's run loop has ended with an error (its process died), or the
        loop of one of its tensor-parallel ranks has ended (they end only with the verifier)."""
        if self.verifier is None or not self._runs:
            return False
        if self._tp_runs and ray.wait(self._tp_runs, timeout=0)[0]:
            return False
        ready, _ = ray.wait([self._runs[0]], timeout=0)
        if not ready:
            return True
        try:
            ray.get(ready[0])
            return True   # a clean return: stopped on purpose
        except Exception:
            return False

    def loop_threads(self, timeout_s: float = 10.0) -> list[int]:
        """The OS thread ids of the verifier's and the drafters' loops, once they run."""
        actors = [a for a in (self.verifier, *(d.actor for d in self.drafters)) if a is not None]
        deadline = time.perf_counter() + timeout_s
        while True:
            tids = ray.get([a.loop_thread.remote() for a in actors])
            if all(t is not None for t in tids) or time.perf_counter() > deadline:
                return [t for t in tids if t is not None]
            time.sleep(0.05)

    def verifier_pid(self) -> int:
        return ray.get(self.verifier.pid.remote())

    def node_ids(self) -> dict[str, str]:
        """The Ray node each role runs on."""
        actors = {"verifier": self.verifier, "drafter": self.drafter,
                  **{f"drafter {d.index}": d.actor for d in self.drafters[1:]}}
        return {role: ray.get(a.node_id.remote(), timeout=CALL_TIMEOUT_S) for role, a in actors.items() if a}

    def check_drafter(self, i: int = 0) -> bool:
        """True when drafter i's run loop is still going (or cleanly finished), or while a
        replacement waits to be placed; a replacement that has started joins here."""
        d = self.drafters[i]
        if d.run is None:
            return self._join_when_started(d)
        ready, _ = ray.wait([d.run], timeout=0)
        if not ready:
            return True
        try:
            ray.get(ready[0])
            return True
        except Exception:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.verifier is not None:
            try:
                ray.get(self.verifier.stop.remote(), timeout=timeout_s)
                ray.wait(self._runs, timeout=timeout_s)
            except Exception as e:
                log.warning("verifier did not stop cleanly: %s", e)
        for a in (*(d.actor for d in self.drafters), self.verifier, *self.tp_workers):
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        if self.events is not None:
            self.events.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
        for d in self.drafters:
            d.actor = None
        self.verifier = self.pg = self.events = None


EMBEDDED_START_ATTEMPTS = 3


def embedded_ray_env() -> None:
    """Ray starts its workers at niceness 15; the verifier and drafter are the critical path, so
    on a busy host they would starve (a model actor took 25 s instead of 1 s to start). Must be
    set before the raylet starts; `ray start` users set RAY_worker_niceness=0 themselves."""
    os.environ.setdefault("RAY_worker_niceness", "0")
    # A new local cluster turns token authentication on by default and announces it on stderr each
    # start; the embedded cluster is ours and listens on this host only, so the notice is noise.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_auth_notice)


def _no_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def init_ray(address: str | None, num_cpus: int | None = None, namespace: str = "outrider") -> None:
    """Start an embedded local cluster (address None) or join one ("auto", "ray://...")."""
    if ray.is_initialized():
        return
    t0 = time.perf_counter()
    if address is None:
        embedded_ray_env()
        for attempt in range(1, EMBEDDED_START_ATTEMPTS + 1):
            try:
                ray.init(address="local", num_cpus=num_cpus, namespace=namespace, include_dashboard=False,
                         log_to_driver=True, configure_logging=False)
                break
            except Exception as e:  # Ray gives its raylet a fixed 30 s to register; a busy host can miss it
                if "timed out during startup" not in str(e) or attempt == EMBEDDED_START_ATTEMPTS:
                    raise
                log.warning("embedded Ray did not come up (%s); retrying (%d/%d)", e, attempt + 1,
                            EMBEDDED_START_ATTEMPTS)
                ray.shutdown()
    else:
        ray.init(address=address, namespace=namespace, log_to_driver=True, configure_logging=False)
    log.info("ray up in %.1fs (%s)", time.perf_counter() - t0, address or "embedded")
