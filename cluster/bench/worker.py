"""A/B benches whose arms each need a fresh process (one engine, its own torch.distributed group):
`python -m <module> worker <flags>` runs one arm and prints its result as the last JSON line;
`python -m <module> [compare] <flags>` runs the arms and compares them."""
from __future__ import annotations

import argparse
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


def ab_parser(prog: str, doc: str, config: str = "configs/local-cpu.yaml", new: int = 32) -> argparse.ArgumentParser:
    """The flags every such bench takes: compare or worker, the config, tokens, repetitions, output."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    p.add_argument("cmd", nargs="?", default="compare", choices=["compare", "worker"])
    p.add_argument("--config", default=config)
    p.add_argument("--new", type=int, default=new)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--out", default=None)
    return p


def ab_main(p: argparse.ArgumentParser, argv, worker, compare) -> int:
    """Parse, then run one arm (`worker`) or the comparison."""
    a = p.parse_args(argv)
    if a.cmd == "worker":
        worker(a)
        return 0
    return compare(a)
