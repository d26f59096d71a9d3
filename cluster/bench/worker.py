"""A/B benches whose arms each need a fresh process (one engine, its own torch.distributed group):
`python -m <module> worker <flags>` runs one arm and prints its result as the last JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository root: the workers import from it


def run_arm(module: str, flags: list[str], timeout_s: float = 1800) -> dict:
    """Run `module`'s worker with `flags` from the repository root; its last JSON line."""
    cmd = [sys.executable, "-m", module, "worker", *flags]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                         timeout=timeout_s)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{module} worker {' '.join(flags)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])
