"""`outrider serve`: the gRPC front end over the coordinator and the Ray engine.

Life cycle: the port opens first with health NOT_SERVING (so probes and clients get a clear
answer while models load), the engine comes up (`cluster.replicas` of them, each in its own
placement group, behind the one endpoint: cluster/serving/replicas.py), health turns SERVING. On SIGTERM or SIGINT:
NOT_SERVING, refuse new requests, let in-flight ones finish within `server.drain_grace_s`,
abort the rest, stop the actors, tear down the data plane, exit 0.
"""
from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.config import ConfigError, DeploymentConfig, load_config
from cluster.launch.deployment import engine_spec, shutdown_ray, start_engine, tokenizer_for
from cluster.serving.metrics import Metrics
from cluster.serving.replicas import Replica, ReplicaSet
from cluster.rpc.outrider.v1 import outrider_pb2 as pb
from cluster.serving.service import SERVICE, OutriderService, info_for
from cluster.serving.validate import Limits

log = logging.getLogger(__name__)
HEALTH_CHECK_PREFIX = "/grpc.health.v1.Health/"


class TokenAuth(grpc.ServerInterceptor):
    """Bearer-token check on every call except health probes (load balancers carry no token)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_CHECK_PREFIX):
            return handler
        got = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(got.encode(), self._expected):
            return handler
        return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


def _refuse(handler, code, message):
    def deny(request, context):
        context.abort(code, message)

    def deny_stream(request, context):
        context.abort(code, message)
        yield  # pragma: no cover (abort raises)

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.request_streaming or handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    return grpc.unary_unary_rpc_method_handler(deny, **kw)


def _tls_credentials(cfg: DeploymentConfig):
    tls = cfg.server.tls
    pair = []
    for key in ("key_file", "cert_file"):
        path = getattr(tls, key)
        try:
            pair.append(Path(path).expanduser().read_bytes())
        except OSError as e:
            raise ConfigError(f"server.tls.{key}: cannot read {path!r} ({e.strerror or e})") from None
    return grpc.ssl_server_credentials([(pair[0], pair[1])])


class OutriderServer:
    def __init__(self, cfg: DeploymentConfig):
        self.cfg = cfg
        self.spec = engine_spec(cfg)
        log.info("memory plan:\n%s", self.spec.extra.get("memory_plan", "(none)"))
        self.tok = tokenizer_for(self.spec)
        self.replicas: ReplicaSet | None = None
        self.health = health.HealthServicer()
        self.metrics = Metrics(lambda: self.replicas.engines() if self.replicas else [],
                               routes_ref=lambda: self.replicas.decisions if self.replicas else {}) \
            if cfg.metrics.enabled else None
        self.metrics_port: int | None = None
        limits = Limits(self.tok.vocab_size, self.spec.max_seq_len, cfg.server.max_new_tokens_limit,
                        cfg.server.default_max_new_tokens, self.spec.k if self.spec.speculative else None)
        self.service = OutriderService(self.tok, limits, info_for(self.spec, cfg), self.metrics)
        self.grpc: grpc.Server | None = None
        self.port: int | None = None
        self.http = None                      # cluster.serving.api.http.HTTPServer when http.enabled
        self.http_port: int | None = None
        self._stopped = threading.Event()

    # The first replica's parts (the only ones with cluster.replicas: 1); `coord` is the replica
    # set, which routes each request to one replica's coordinator.
    @property
    def coord(self) -> ReplicaSet | None:
        return self.replicas

    @property
    def engine(self):
        return self.replicas.replicas[0].engine if self.replicas else None

    @property
    def supervisor(self):
        return self.replicas.replicas[0].supervisor if self.replicas else None

    # -- bring-up ------------------------------------------------------------------------------
    def start(self) -> OutriderServer:
        s = self.cfg.server
        token = s.auth_token()  # fail before anything starts if the variable is missing
        interceptors = [TokenAuth(token)] if token else []
        # Every stream holds a worker thread; beyond the pool gRPC answers RESOURCE_EXHAUSTED itself.
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="grpc"),
                                interceptors=interceptors, maximum_concurrent_rpcs=s.workers)
        self.grpc.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc)
        self.set_health(False)
        address = f"{s.host}:{s.port}"
        if s.tls is not None:
            self.port = self.grpc.add_secure_port(address, _tls_credentials(self.cfg))
        else:
            self.port = self.grpc.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"server.port: cannot bind {address}")
        self.grpc.start()
        log.info("listening on %s:%d (%s), loading the engine", s.host, self.port, "TLS" if s.tls else "plaintext")
        if self.metrics is not None:
            self.metrics_port = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
        if self.cfg.http.enabled:
            self.start_http(token)
        n = self.cfg.cluster.replicas
        if self.cfg.cluster.launcher == "ray":   # here, in the main thread, before replicas start side by side
            from cluster.launch.engine import init_ray

            init_ray(self.cfg.cluster.address, self.cfg.cluster.num_cpus, self.cfg.cluster.namespace)
        self.replicas = ReplicaSet.start(n, lambda i: Replica(i, self.new_engine, self.tok, s.max_queue,
                                                              s.stream_interval_s, self.spec.max_batch,
                                                              on_change=self._replica_changed))
        self.service.coord = self.replicas
        self.replicas.start_supervisors()
        self.set_health(True)
        log.info("serving %s on %s:%d (mode=%s k=%d, %d replica%s)", pb.DESCRIPTOR.package, s.host, self.port,
                 self.spec.mode, self.spec.k, n, "" if n == 1 else "s")
        return self

    def start_http(self, token: str | None) -> None:
        from cluster.serving.api.http import HTTPServer, build_app

        h = self.cfg.http
        app = build_app(self.service, h.model_name or self.cfg.models.target.path, token, h.max_body_bytes)
        tls = self.cfg.server.tls
        self.http = HTTPServer(app, h.host, h.port, (tls.cert_file, tls.key_file) if tls else None).start()
        self.http_port = self.http.port
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if tls else "http", h.host, self.http_port)

    def new_engine(self):
        return start_engine(self.cfg, self.spec)

    def _replica_changed(self, replica) -> None:
        """SERVING while at least one replica is up (a rebuild elsewhere does not stop the server)."""
        if not self._stopped.is_set() and self.replicas is not None:
            self.set_health(any(r.up for r in self.replicas.replicas))

    def set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            self.health.set(name, status)

    # -- shutdown ------------------------------------------------------------------------------
    def drain(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new work, give in-flight requests `grace_s` to finish, abort the rest."""
        grace_s = self.cfg.server.drain_grace_s if grace_s is None else grace_s
        self.set_health(False)
        if self.coord is None:
            return
        self.coord.draining = True
        self.service.unavailable = "the server is draining"
        deadline = time.monotonic() + grace_s
        while self.coord.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.coord.in_flight
        if left:
            log.warning("drain grace (%.1fs) over: aborting %d requests", grace_s, left)
            self.coord.abort_all(reason="abort")
            end = time.monotonic() + 5
            while self.coord.in_flight and time.monotonic() < end:
                time.sleep(0.05)

    def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.replicas is not None:
            for r in self.replicas.replicas:
                if r.supervisor is not None:
                    r.supervisor.stop()
        self.drain(grace_s)
        if self.grpc is not None:
            self.grpc.stop(grace=1.0).wait()
        if self.http is not None:
            self.http.stop()
        if self.replicas is not None:
            for r in self.replicas.replicas:
                r.stop()
        if self.metrics is not None:
            self.metrics.close()
        log.info("server stopped")


def serve_from_config(path: str, overrides: dict | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then drain and stop cleanly. Returns the exit code."""
    cfg = load_config(path, overrides)
    server = OutriderServer(cfg)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server.start()
        # ray.init installs its own SIGTERM handler (a bare exit 15): take the signals back.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
        log.info("signal received: draining (grace %.1fs)", cfg.server.drain_grace_s)
    finally:
        server.stop()
        shutdown_ray()
    return 0
