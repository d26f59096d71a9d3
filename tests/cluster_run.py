"""What tests/replicas_run.py and tests/multinode_run.py share: each runs as a process of its own
(`python -m tests.NAME_run ARGS.json`) and writes what it saw to a JSON file for its test."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from cluster.launch.deployment import shutdown_ray


def wait(cond, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Seconds until `cond()` held; raises after `timeout_s`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s}s")
        time.sleep(poll_s)
    return time.monotonic() - t0


def stop(server, cluster) -> None:
    """Stop the server (if it started), this process's Ray driver and the local cluster."""
    if server is not None:
        server.stop(grace_s=1)
    shutdown_ray()
    cluster.shutdown()


def main(run, name: str) -> int:
    """`run(args, seen)` with the args of the JSON file named on the command line; writes `seen`
    (with "error" if `run` raised) to args["out"]. Returns the process's exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = json.loads(Path(sys.argv[1]).read_text())
    seen: dict = {}
    try:
        run(args, seen)
    except Exception as e:
        logging.getLogger(name).exception("%s run failed", name)
        seen["error"] = f"{type(e).__name__}: {e}"
    with open(args["out"], "w") as f:
        json.dump(seen, f)
    return 1 if "error" in seen else 0
