"""`make demo`: build the demo pair (cached), serve it on an embedded local Ray cluster, send one
request through the gRPC client, print the streamed text and the statistics, shut down."""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cluster.client import OutriderClient
from cluster.config import load_config
from cluster.deployment import shutdown_ray
from cluster.server import OutriderServer

DEFAULT_PROMPT = 'def read_config(path):\n    """Read a configuration file and return a dict."""\n    with'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.demo")
    ap.add_argument("--config", "-c", default="configs/local-cpu.yaml")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ephemeral ports: the demo never collides with a server already running here.
    cfg = load_config(args.config, {"server.port": 0, "metrics.port": 0})
    server = OutriderServer(cfg)
    try:
        server.start()
        with OutriderClient(f"127.0.0.1:{server.port}") as client:
            client.wait_ready()
            info = client.info()
            out = sys.stdout
            out.write(f"\n=== outrider {info.versions['outrider']}: mode={info.mode} k={info.k} "
                      f"target={info.target_model} draft={info.draft_model}\n=== prompt:\n{args.prompt}\n")
            out.write("=== streamed continuation:\n")
            final, t0 = None, time.perf_counter()
            for item in client.generate(args.prompt, max_new_tokens=args.max_new_tokens):
                if item.HasField("chunk"):
                    out.write(item.chunk.text)
                    out.flush()
                else:
                    final = item.final
            s = final.stats
            out.write(f"\n=== finish={final.finish_reason} tokens={final.usage.completion_tokens} "
                      f"in {time.perf_counter() - t0:.2f}s ({s.tokens_per_s:.1f} tok/s), "
                      f"time to first token {s.time_to_first_token_s * 1000:.0f} ms\n")
            out.write(f"=== acceptance {s.acceptance_rate:.2f}, mean acceptance length "
                      f"{s.mean_acceptance_length:.2f}, cache hit rate {s.hit_rate:.2f} "
                      f"({s.cache_hits}/{s.cache_hits + s.cache_misses}), hits by depth {list(s.hits_by_depth)}\n")
    finally:
        server.stop(grace_s=2)
        shutdown_ray()
    return 0


if __name__ == "__main__":
    sys.exit(main())
