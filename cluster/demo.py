"""`make demo`: serve a model pair on an embedded local cluster, send one request through the gRPC
client, print the streamed answer and the speculation statistics, shut down.

By default it serves the real pair (configs/smol-cpu.yaml: SmolLM2-135M-Instruct and a drafter
distilled from it, both built once and cached) and sends a chat message; `--prompt` sends raw text
instead (the tiny test pair, configs/local-cpu.yaml, has no chat template).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from cluster.serving.client import OutriderClient
from cluster.config import load_config
from cluster.launch.deployment import shutdown_ray
from cluster.serving.server import OutriderServer

DEFAULT_CHAT = "Write a Python function that checks whether a string is a palindrome."


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.demo")
    ap.add_argument("--config", "-c", default="configs/smol-cpu.yaml")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--chat", default=None, help=f"a user message (default: {DEFAULT_CHAT!r})")
    src.add_argument("--prompt", default=None, help="raw prompt text instead of a chat message")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--log-level", default="WARNING", help="outrider's log level (the answer prints regardless)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    request = args.prompt if args.prompt is not None else [{"role": "user", "content": args.chat or DEFAULT_CHAT}]
    # Ephemeral ports: the demo never collides with a server already running here.
    cfg = load_config(args.config, {"server.port": 0, "metrics.port": 0, "http.port": 0})
    out = sys.stdout
    out.write(f"=== starting {cfg.speculation.mode} on {cfg.models.target.path} + {cfg.models.draft.path} ...\n")
    out.flush()
    server = OutriderServer(cfg)
    try:
        server.start()
        with OutriderClient(f"127.0.0.1:{server.port}") as client:
            client.wait_ready()
            info = client.info()
            shown = request if isinstance(request, str) else request[-1]["content"]
            out.write(f"=== outrider {info.versions['outrider']}: mode={info.mode} k={info.k} "
                      f"target={info.target_model} draft={info.draft_model}\n"
                      f"=== {'prompt' if isinstance(request, str) else 'user'}: {shown}\n=== answer:\n")
            final, t0 = None, time.perf_counter()
            for item in client.generate(request, max_new_tokens=args.max_new_tokens):
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
