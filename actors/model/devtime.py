"""Timing device work without adding a sync.

On a GPU the forward returns as soon as its kernels are queued, so a host clock around it
measures the launch, not the work, and the adaptive K policy would be fed launch times. CUDA
events recorded around the work and read after the step's own read-back of (k, t*), which has
waited for them anyway, give the device time at no extra sync. On a CPU the host clock is the
device's.
"""
from __future__ import annotations

import time

import torch


class DeviceTimer:
    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._t0 = self._s = 0.0
        self._events = None

    def start(self) -> None:
        if self.cuda:
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._events[1].record()
        else:
            self._s = time.perf_counter() - self._t0

    def seconds(self) -> float:
        """The timed work's seconds; on CUDA call it only after something has waited for the work."""
        if self.cuda:
            return self._events[0].elapsed_time(self._events[1]) / 1e3
        return self._s
