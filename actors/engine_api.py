"""The calls an engine answers: what the coordinator, the supervisor and the benchmarks use.

Two engines implement it: `RayEngine` (cluster/launch/engine.py: the verifier, its tensor-parallel
ranks and its drafters as Ray actors) and `LocalEngine` (actors/launch.py: the verifier in a thread
of this process, the drafter in a child process, no Ray). Neither inherits from it; the protocol
is structural, and tests/test_engine_api.py checks both answer every call with the same parameters.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    # -- bring-up and shutdown
    def start(self) -> Engine:
        """Start every process and form the data plane; returns self once it serves."""

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the drafters and the verifier down."""

    # -- the coordinator's calls
    def submit(self, req) -> None:
        """Queue a request (actors.sequence.Request or its dict) at the verifier."""

    def abort(self, request_id: int) -> None:
        """Drop a request; its sequence and KV are freed at the next step."""

    def poll(self, timeout: float = 0.05, linger_s: float = 0.0) -> list[dict]:
        """Committed-token events since the last poll (waiting up to `timeout` for the first)."""

    def metrics(self) -> dict:
        """The verifier's counters and load, with the drafters' statistics."""

    # -- the supervisor's calls
    def verifier_alive(self) -> bool:
        """False once the verifier (or one of its tensor-parallel ranks) has died."""

    def check_drafter(self, i: int = 0) -> bool:
        """Whether drafter `i` is up (or still starting); a replacement joins from here."""

    def restart_drafter(self, i: int = 0) -> None:
        """Replace drafter `i`; the verifier serves without its drafts meanwhile."""

    def drafter_pid(self, i: int = 0) -> int:
        """Drafter `i`'s process id (fault injection, reports)."""

    def tp_pids(self) -> list[int]:
        """The tensor-parallel ranks' process ids, rank 1 first."""
