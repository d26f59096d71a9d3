"""The engine's roles as Ray actors: the verifier, a drafter and a tensor-parallel rank, each the
plain class from actors/ with what only a Ray deployment asks of it (readiness, its node and
process, the data plane's port on its node). cluster/launch/engine.py places and starts them."""
from __future__ import annotations

import os
import socket

import psutil
import ray

from actors.drafter import Drafter
from actors.engine_spec import EngineSpec
from actors.model.tp.worker import TPWorker
from actors.protocol.ports import reserve_port
from actors.verifier import Verifier


def _gloo_on_node_address() -> None:
    """gloo binds its pairs to whatever this host's name resolves to, which Debian and Ubuntu map
    to 127.0.1.1 in /etc/hosts: a peer on another node would then be told to connect to its own
    loopback. Point gloo at the interface that carries this node's Ray address instead (the
    address the other nodes already reach). A loopback node address needs nothing."""
    ip = ray.util.get_node_ip_address()
    if "GLOO_SOCKET_IFNAME" in os.environ or ip.startswith("127."):
        return
    name = interface_with(ip)
    if name is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = name


def interface_with(ip: str) -> str | None:
    """The network interface that holds address `ip` here, if any."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family in (socket.AF_INET, socket.AF_INET6) and a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


class _OnRay:
    """What only a Ray deployment asks an engine actor."""

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def loop_thread(self) -> int | None:
        return self.loop_tid


class VerifierActor(_OnRay, Verifier):
    def __init__(self, spec: EngineSpec):
        _gloo_on_node_address()
        super().__init__(spec)

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A port for the data plane on this node's address, bound and listening here until the
        loop's connect takes it over (no window for another process to take it); the drafter
        may join from another node."""
        return reserve_port(self.node_ip())

    def open_events(self, token: str, local_only: bool = False) -> int:
        """The host's event stream: on 127.0.0.1 when the serving process is on this node, else
        on this node's address (the one the serving process reaches it by)."""
        return self.events.listen(token, "127.0.0.1" if local_only else self.node_ip())


class DrafterActor(_OnRay, Drafter):
    def __init__(self, spec: EngineSpec):
        _gloo_on_node_address()
        super().__init__(spec)

    def join_and_run(self, addr: str, port: int) -> None:
        """Join the verifier's data plane, then serve it until SHUTDOWN; one call, so Ray reports
        a failure to join and a lost loop the same way (the call raises)."""
        self.connect(addr, port)
        self.run()


class TPWorkerActor(_OnRay, TPWorker):
    def __init__(self, spec: EngineSpec, rank: int):
        _gloo_on_node_address()
        super().__init__(spec, rank)

    def join_and_run(self, addr: str, port: int) -> None:
        """Join rank 0's tensor-parallel group, then serve its calls until told to stop; one call,
        so Ray reports a failure to join and a lost loop the same way (the call raises)."""
        self.connect(addr, port)
        self.run()
