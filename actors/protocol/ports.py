"""TCP ports for the data plane's and the tensor-parallel group's stores: bound at once and handed
over (`reserve_port`, `take_reserved`, `listening_socket`), so no other process can take a port
between choosing it and using it; `free_port` for a port another program must bind."""
from __future__ import annotations

import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on `host` ("" = every interface, for a peer on another node). Racy by
    nature (the port is free now, not when someone binds it): for a port another program must
    bind. The data plane uses reserve_port(), which binds at once and hands the socket over."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_reserved: dict[int, socket.socket] = {}
_reserved_lock = threading.Lock()


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to an ephemeral port on `host` and listening: a rank-0 Channel given it
    (`listen_sock=`) serves the group's store on it, so no other process can take the port between
    choosing it and using it."""
    s = socket.create_server((host, 0), backlog=16)
    s.set_inheritable(False)
    return s


def reserve_port(host: str = "127.0.0.1") -> int:
    """Bind and listen on an ephemeral port now and keep the socket for a rank-0 Channel of this
    process on that port, which takes it over when it connects; the port goes to the peer."""
    s = listening_socket(host)
    port = s.getsockname()[1]
    with _reserved_lock:
        _reserved[port] = s
    return port


def take_reserved(port: int) -> socket.socket | None:
    """The socket reserve_port() bound for `port` (a store that serves on it takes it over), or
    None; the caller owns it from then on (the TP group's rendezvous takes it the same way)."""
    with _reserved_lock:
        return _reserved.pop(port, None)
