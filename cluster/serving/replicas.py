"""Several engine replicas behind one endpoint (`cluster.replicas`).

Each replica is a whole engine (a verifier with its tensor-parallel ranks and its drafter, in a
placement group of its own, so Ray spreads replicas over nodes as their resources allow), with
its own coordinator (its poller, its in-flight requests) and its own supervisor. The replica set
stands where one coordinator stood for the gRPC and HTTP front ends: `submit` asks the router
(cluster/serving/router.py) which replica serves a request, `find`, `in_flight`, `draining` and `error`
span all of them.

A replica whose verifier dies is rebuilt by its supervisor while the others keep serving. Its
requests that have already streamed tokens end with UNAVAILABLE (their state is gone, and a
client that has read part of an answer cannot be given another one's start); the ones that have
not are moved to another replica (the same handle, so the client just waits a little longer).
With one replica nothing moves, exactly as before.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from cluster.serving.coordinator import Coordinator, EngineUnavailable, GenerateArgs, Handle, QueueFull
from cluster.serving.router import Load, Router
from cluster.launch.supervisor import Supervisor

log = logging.getLogger(__name__)
HISTORY = 4096   # routing decisions kept for inspection (request id, replica, reason)


class Replica:
    """One engine, its coordinator and its supervisor."""

    def __init__(self, index: int, start_engine, tok, max_queue: int, stream_interval_s: float, max_batch: int,
                 on_change=None):
        self.index = index
        self._start_engine = start_engine   # () -> a started engine (RayEngine or LocalEngine)
        self.tok, self.max_queue, self.stream_interval_s, self.max_batch = tok, max_queue, stream_interval_s, max_batch
        self.on_change = on_change          # called when the replica goes down or comes back up
        self.engine = None
        self.coord: Coordinator | None = None
        self.supervisor: Supervisor | None = None
        self.rebuilding = False
        self.kv_usage = 0.0                 # the last fraction of KV blocks in use it reported

    def start(self) -> Replica:
        self.engine = self.new_engine()
        self.coord = Coordinator(self.engine, self.tok, self.max_queue, self.stream_interval_s)
        return self

    def new_engine(self):
        return self._start_engine()

    @property
    def up(self) -> bool:
        c = self.coord
        return c is not None and not self.rebuilding and c.error is None and not c.draining

    def load(self) -> Load:
        return Load(up=self.up, depth=self.coord.in_flight if self.coord else 0, kv_usage=self.kv_usage,
                    max_batch=self.max_batch)

    def set_up(self, up: bool) -> None:
        self.rebuilding = not up
        if self.on_change is not None:
            self.on_change(self)

    def refresh_load(self) -> None:
        """Read the verifier's KV use for the router (the supervisor calls this every check)."""
        from cluster.serving.metrics import kv_usage

        try:
            self.kv_usage = kv_usage(self.engine.metrics())
        except Exception as e:  # a replica that cannot answer is caught by the liveness checks
            log.debug("replica %d: metrics unavailable: %s", self.index, e)

    def start_supervisor(self) -> None:
        self.supervisor = Supervisor(self).start()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.coord is not None:
            self.coord.stop()
        if self.engine is not None:
            self.engine.stop()


class ReplicaSet:
    """The coordinator the front ends talk to: routes each request to one replica."""

    def __init__(self, replicas: list[Replica], router: Router | None = None):
        self.replicas = replicas
        self.router = router or Router()
        self._lock = threading.Lock()
        self.decisions: collections.Counter = collections.Counter()   # (replica, reason) -> requests
        self.moved = 0                                                # requests moved off a lost replica
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self._ids = itertools.count(1)   # request ids unique across replicas (each counts its own eids)
        for r in replicas:
            if r.coord is not None:
                r.coord.on_lost = lambda h, i=r.index: self._move(h, i)
            r.on_change = lambda rep, outer=r.on_change: self._changed(rep, outer)

    def _changed(self, replica: Replica, outer) -> None:
        """A replica went down (its state, and so its warm prefixes, are gone) or came back."""
        if replica.rebuilding:
            with self._lock:
                self.router.forget(replica.index)
        if outer is not None:
            outer(replica)

    @classmethod
    def start(cls, n: int, make_replica) -> ReplicaSet:
        """Bring n replicas up at once (each waits on Ray for its placement group and models);
        one that fails stops the others and raises."""
        replicas = [make_replica(i) for i in range(n)]
        if n == 1:
            return cls([replicas[0].start()])
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="replica-start") as pool:
            futures = [pool.submit(r.start) for r in replicas]
            errors = [f.exception() for f in futures]
        if any(errors):
            for r, e in zip(replicas, errors):
                if e is None:
                    r.stop()
            raise next(e for e in errors if e is not None)
        return cls(replicas)

    def start_supervisors(self) -> None:
        for r in self.replicas:
            r.start_supervisor()

    # -- the coordinator's surface -------------------------------------------------------------
    def submit(self, args: GenerateArgs, events=None) -> Handle:
        """Route and start a request; QueueFull / EngineUnavailable only when no replica takes it."""
        tried: set[int] = set()
        last: Exception | None = None
        if not args.request_id and len(self.replicas) > 1:
            args = dataclasses.replace(args, request_id=f"req-{next(self._ids)}")
        with self._lock:   # choose and register together: concurrent requests see each other's depth
            while True:
                pick = self.router.choose(args.prompt_ids, [r.load() for r in self.replicas], frozenset(tried))
                if pick is None:
                    if last is not None:
                        raise last
                    return self.replicas[0].coord.submit(args, events)   # raises the replica's own reason
                i, reason = pick
                try:
                    h = self.replicas[i].coord.submit(args, events)
                except (QueueFull, EngineUnavailable) as e:
                    tried.add(i)
                    last = e
                    continue
                self._placed(h, i, reason)
                return h

    def _placed(self, h: Handle, i: int, reason: str) -> None:
        h.replica = i
        self.router.record(h.args.prompt_ids, i)
        self.decisions[(i, reason)] += 1
        self.history.append((h.request_id, i, reason))

    def _move(self, h: Handle, lost: int) -> bool:
        """Replica `lost` lost a request that had not streamed: start it on another one."""
        tried = {lost}
        with self._lock:
            while True:
                pick = self.router.choose(h.args.prompt_ids, [r.load() for r in self.replicas], frozenset(tried))
                if pick is None:
                    return False
                i = pick[0]
                try:
                    self.replicas[i].coord.adopt(h)
                except (QueueFull, EngineUnavailable, ValueError) as e:
                    log.info("replica %d cannot take request %s: %s", i, h.request_id, e)
                    tried.add(i)
                    continue
                self._placed(h, i, "moved")
                self.moved += 1
                log.info("request %s moved from replica %d to %d (nothing streamed yet)", h.request_id, lost, i)
                return True

    def find(self, request_id: str) -> Handle | None:
        for r in self.replicas:
            h = r.coord.find(request_id) if r.coord else None
            if h is not None:
                return h
        return None

    @property
    def in_flight(self) -> int:
        return sum(r.coord.in_flight for r in self.replicas if r.coord)

    @property
    def draining(self) -> bool:
        return any(r.coord.draining for r in self.replicas if r.coord)

    @draining.setter
    def draining(self, value: bool) -> None:
        for r in self.replicas:
            if r.coord is not None:
                r.coord.draining = value

    @property
    def error(self) -> str | None:
        """None while some replica can serve; else why not (the first replica's reason)."""
        if any(r.up for r in self.replicas):
            return None
        for r in self.replicas:
            if r.coord is not None and r.coord.error:
                return r.coord.error
        return "every engine replica is being rebuilt" if any(r.rebuilding for r in self.replicas) else None

    def abort_all(self, reason: str = "abort") -> int:
        n = 0
        for r in self.replicas:
            for eid in list(r.coord.handles) if r.coord else []:
                n += r.coord.abort(eid, reason=reason)
        return n

    def engines(self) -> list:
        return [r.engine for r in self.replicas]

    def stop(self) -> None:
        for r in self.replicas:
            if r.supervisor is not None:
                r.supervisor.stop()
        for r in self.replicas:
            if r.coord is not None:
                r.coord.stop()
