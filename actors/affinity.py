"""Pin a role's compute thread to given CPUs (Linux).

The verifier's loop is the engine's critical path: any other thread that wakes on its core
(the serving process, Ray's own threads, the data plane's transport thread, another role)
preempts it in the middle of a forward. Pinning the loop thread to CPUs of its own, and
keeping the rest of the host off them, removes those interruptions. Only the calling thread
is pinned: the process's other threads keep the process's affinity, and torch's worker
threads, started by the pinned thread, inherit its CPUs.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cpus() -> set[int] | None:
    """The CPUs this process may run on, or None where the OS has no affinity call."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def check_cpus(cpus: tuple[int, ...] | None, role: str) -> None:
    """A clear error before anything runs when `cpus` names a CPU this node does not offer."""
    if not cpus:
        return
    usable = usable_cpus()
    if usable is None:
        log.warning("%s: CPU pinning is not supported on this OS; %s ignored", role, list(cpus))
        return
    missing = sorted(set(cpus) - usable)
    if missing:
        raise ValueError(f"{role}: CPUs {missing} are not available on this node (usable: {sorted(usable)})")


def pin_this_thread(cpus: tuple[int, ...] | None) -> None:
    if cpus and usable_cpus() is not None:
        os.sched_setaffinity(0, set(cpus))
