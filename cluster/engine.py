"""Bring the engine up on Ray: the verifier and the drafter as actors on separate devices.

Ray is the control plane only: it places the two processes (one placement-group bundle each, so
each gets its own GPU, or its own CPU core on a laptop), starts, health-checks and restarts them.
The per-round traffic goes over the torch.distributed channel the two actors form between
themselves. The coordinator lives in the serving process (the Ray driver), which holds no Ray
resources (the `num_cpus=0` role): it submits and aborts through Ray calls, and committed tokens
come back over a TCP stream the verify loop writes (actors/events.py), read here and long-polled
locally by the coordinator.
"""
from __future__ import annotations

import logging
import os
import secrets
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.channel import reserve_port
from actors.drafter import Drafter
from actors.events import EventReader, EventStreamClosed
from actors.spec import EngineSpec
from actors.verifier import Verifier

log = logging.getLogger(__name__)


class VerifierActor(Verifier):
    """The plain Verifier plus what only a Ray deployment needs to ask it."""

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A port for the data plane, bound and listening here until the loop's connect takes it
        over (no window for another process to take it); the drafter may join from another node."""
        return reserve_port("")

    def pid(self) -> int:
        return os.getpid()

    def loop_thread(self) -> int | None:
        return self.loop_tid


class DrafterActor(Drafter):
    def pid(self) -> int:
        return os.getpid()

    def loop_thread(self) -> int | None:
        return self.loop_tid


def _bundle(device: str, num_threads: int) -> dict:
    if device.startswith("cuda"):
        return {"CPU": num_threads, "GPU": 1}
    return {"CPU": num_threads}


def _options(bundle: dict, pg, index: int, **kw) -> dict:
    return dict(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index), **kw)


class RayEngine:
    """Verifier + drafter actors and their data plane. `submit/abort/poll/metrics` mirror the
    Verifier's own methods, so the coordinator works the same on Ray or in plain processes."""

    def __init__(self, spec: EngineSpec, placement_strategy: str = "PACK", ready_timeout_s: float = 300.0):
        if spec.draft is None and spec.mode != "ar":
            raise ValueError("a draft model is required for sd and ssd")
        self.spec = spec
        self.placement_strategy = placement_strategy
        self.ready_timeout_s = ready_timeout_s
        self.verifier = None
        self.drafter = None
        self.pg = None
        self.events: EventReader | None = None
        self._events_token = secrets.token_hex(16)
        self._runs: list = []

    # -- bring-up ------------------------------------------------------------------------------
    def start(self) -> RayEngine:
        s = self.spec
        bundles = [_bundle(s.target_device, s.num_threads)]
        if s.speculative:
            bundles.append(_bundle(s.draft_device, s.draft_num_threads))
        self.pg = placement_group(bundles, strategy=self.placement_strategy)
        if not self.pg.wait(timeout_seconds=self.ready_timeout_s):
            raise RuntimeError(f"the Ray cluster cannot place {bundles} ({self.placement_strategy}): "
                               f"not enough CPUs/GPUs; see `ray status`")
        self.verifier = ray.remote(VerifierActor).options(
            **_options(bundles[0], self.pg, 0, max_concurrency=16, name=None, max_restarts=0)).remote(s)
        if s.speculative:
            self._start_drafter(bundles[1])
        else:
            self._runs.append(self.verifier.run.remote())
        ray.get(self.verifier.ready.remote(), timeout=self.ready_timeout_s)
        self._open_events()
        return self

    def _open_events(self, timeout_s: float | None = None) -> None:
        """Committed tokens come over a stream of their own (actors/events.py), not Ray calls.
        Reopened after a break, it continues after the last event the old stream delivered."""
        timeout_s = timeout_s or self.ready_timeout_s
        addr = ray.get(self.verifier.node_ip.remote(), timeout=timeout_s)
        local = addr == ray.util.get_node_ip_address()   # then nothing outside this host can connect
        port = ray.get(self.verifier.open_events.remote(self._events_token, local), timeout=timeout_s)
        addr = "127.0.0.1" if local else addr
        after = self.events.last_n if self.events is not None else 0
        self.events = EventReader(addr, port, self._events_token, timeout_s, after=after)

    def _start_drafter(self, bundle: dict | None = None) -> None:
        bundle = bundle or _bundle(self.spec.draft_device, self.spec.draft_num_threads)
        addr = ray.get(self.verifier.node_ip.remote())
        port = ray.get(self.verifier.free_port.remote())
        self.drafter = ray.remote(DrafterActor).options(
            **_options(bundle, self.pg, 1, max_concurrency=2)).remote(self.spec)
        first = not self._runs
        if first:  # the verifier's loop is not running yet: form the group directly
            v = self.verifier.connect.remote(addr, port)
            d = self.drafter.connect.remote(addr, port)
            ray.get([v, d], timeout=self.ready_timeout_s)
            self._runs.append(self.verifier.run.remote())
        else:      # the loop is running: it joins the new group itself, between steps
            self.verifier.reconnect.remote(addr, port)
            ray.get(self.drafter.connect.remote(addr, port), timeout=self.ready_timeout_s)
        self._drafter_run = self.drafter.run.remote()
        log.info("engine up: mode=%s k=%d, data plane on %s:%d", self.spec.mode, self.spec.k, addr, port)

    def restart_drafter(self) -> None:
        """Replace a dead drafter; the verifier keeps serving (without drafts) meanwhile."""
        if self.drafter is not None:
            ray.kill(self.drafter, no_restart=True)
        self._start_drafter()

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
        if self.drafter is not None:
            try:
                m["drafter"] = ray.get(self.drafter.stats.remote(), timeout=5)
            except Exception:  # a dead drafter must not break metrics
                m["drafter"] = None
        return m

    def drafter_pid(self) -> int:
        return ray.get(self.drafter.pid.remote())

    def verifier_alive(self) -> bool:
        """False once the verifier's run loop has ended with an error (its process died)."""
        if self.verifier is None or not self._runs:
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
        """The OS thread ids of the verifier's and the drafter's loops, once they run."""
        actors = [a for a in (self.verifier, self.drafter) if a is not None]
        deadline = time.perf_counter() + timeout_s
        while True:
            tids = ray.get([a.loop_thread.remote() for a in actors])
            if all(t is not None for t in tids) or time.perf_counter() > deadline:
                return [t for t in tids if t is not None]
            time.sleep(0.05)

    def verifier_pid(self) -> int:
        return ray.get(self.verifier.pid.remote())

    def check_drafter(self) -> bool:
        """True when the drafter's run loop is still going (or cleanly finished)."""
        ready, _ = ray.wait([self._drafter_run], timeout=0)
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
        for a in (self.drafter, self.verifier):
            if a is not None:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        if self.events is not None:
            self.events.close()
        if self.pg is not None:
            remove_placement_group(self.pg)
        self.verifier = self.drafter = self.pg = self.events = None


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
