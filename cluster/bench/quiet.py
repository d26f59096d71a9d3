"""Keep the engines that are not being timed from taxing the one that is.

Every Ray actor process wakes ~100 times a second (its core worker's event loop), and so does
the transport thread of every gloo group, busy or idle. The bench keeps all of a phase's engines
up side by side (restarting one per repetition would cost more than the runs), so while one
engine is timed the idle ones would interrupt the two cores it owns about a thousand times a
second. SSD keeps both cores busy, so those wake-ups land on its verifier and drafter. A
deployed engine has its machine to itself, and that is what the bench should time.

So for the duration of each timed run, every thread of the idle engines' processes is put in
the SCHED_IDLE class: a waking idle-class thread never preempts a running normal one; it runs
only on a core that has nothing else to do. Their threads go back to SCHED_OTHER right after.
In two one-off interleaved A/Bs (SSD beside four idle engines, 24 runs each) this cut SSD's
verify from 15.74 to 15.01 and from 13.77 to 13.19 ms per round, and its wall time per round by
0.5-0.8 ms. Stopping the idle engines outright (SIGSTOP) did no better (13.63 ms) and once
stalled the timed engine's drafter for ~1 s, so nothing is stopped.

The timed engine's verifier also gets its core to itself, as the target device would be: its
loop thread is pinned to `models.target.cpus` (actors/affinity.py) and, for the run, every other
thread of the bench's process tree (this process, the embedded Ray cluster, every engine but
the two loop threads of the one being timed) is kept off those CPUs. Woken threads otherwise
land on the verifier's core and preempt its forward: in a one-off A/B (SSD, 24 runs each) the
verify went from 13.87 to 12.84 ms per round and the wall time per round from 16.10 to 15.28 ms;
pinning only the two loop threads got half of that.

Only processes of an embedded cluster the bench started itself are touched (they are local, and
their command line names a Ray actor); on a cluster it joined, nothing changes.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import psutil

log = logging.getLogger(__name__)


def engine_pids(engine) -> list[int]:
    """The local processes of an outrider engine on Ray (verifier, and drafter if any)."""
    pids = [engine.verifier_pid()]
    if engine.drafter is not None:
        pids.append(engine.drafter_pid())
    out = []
    for pid in pids:
        try:
            cmd = psutil.Process(pid).cmdline()
        except psutil.Error:
            cmd = []
        if cmd and cmd[0].startswith("ray::"):
            out.append(pid)
        else:  # not a Ray actor of this machine: leave it alone
            log.warning("pid %d is not a local Ray actor process; it stays in the normal class", pid)
    return out


def _set_policy(pids: list[int], policy: int) -> None:
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:   # the process is gone
            continue
        for tid in tids:  # the policy is per thread; threads started later inherit their creator's
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))
            except OSError:
                pass


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:   # the process is gone
        return []


@contextmanager
def isolated(cpus: set[int] | None, keep: list[int]):
    """For the block, every thread of this process tree except `keep` runs off `cpus`; each
    gets its own affinity back afterwards."""
    rest = os.sched_getaffinity(0) - set(cpus) if cpus and hasattr(os, "sched_setaffinity") else None
    if not rest:
        yield
        return
    me = psutil.Process()
    saved: dict[int, set[int]] = {}
    for pid in [me.pid] + [c.pid for c in me.children(recursive=True)]:
        for tid in _threads(pid):
            if tid in keep:
                continue
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, rest)
            except OSError:   # gone, or not ours to move
                saved.pop(tid, None)
    try:
        yield
    finally:
        for tid, mask in saved.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass


@contextmanager
def on_cpus(cpus: set[int] | None):
    """Pin the calling thread to `cpus` for the block (a direct timing on the target's core)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextmanager
def in_background(pids: list[int]):
    """Run these processes in the idle scheduling class for the duration of the block."""
    if not pids or not hasattr(os, "SCHED_IDLE"):
        yield
        return
    _set_policy(pids, os.SCHED_IDLE)
    try:
        yield
    finally:
        _set_policy(pids, os.SCHED_OTHER)
