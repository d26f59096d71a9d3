"""`outrider` command line: models, generate, serve, bench."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("outrider")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _csv(kind):
    def parse(text: str) -> list:
        try:
            items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="outrider", description="SSD speculative-decoding inference cluster")
    ap.add_argument("--log-level", default="INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("models", help="build the local demo model pair")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    b = msub.add_parser("build", help="train and cache the demo target/drafter pair")
    b.add_argument("--size", choices=["tiny", "bench", "smol"], default="tiny",
                   help="smol: SmolLM2-135M-Instruct from PyPI and a drafter distilled from it")
    b.add_argument("--out", default=None,
                   help="models directory (default $OUTRIDER_MODELS_DIR or ~/.cache/outrider/models)")
    b.add_argument("--force", action="store_true")
    b.add_argument("--head", action="store_true",
                   help="smol: also train the draft head demo:smol/head (docs/eagle.md; ~9 min on two cores)")
    b.add_argument("--budget", type=float, default=None, metavar="MIN",
                   help="smol, with --head: minutes of head training on two cores (default 5), built beside the "
                        "default head as head-<MIN>min")

    g = sub.add_parser("generate", help="generate text: in-process, on a local cluster, or from a server")
    g.add_argument("prompt_pos", nargs="?", metavar="PROMPT")
    g.add_argument("--prompt", default=None)
    g.add_argument("--chat", default=None, metavar="MESSAGE",
                   help="a user message, rendered with the model's chat template (instead of a prompt)")
    g.add_argument("--system", default=None, help="--chat: a system message before it")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--config", "-c", help="deployment YAML: run the engine on Ray")
    src.add_argument("--server", help="HOST:PORT of a running `outrider serve`")
    src.add_argument("--target", help="target checkpoint dir (in-process)")
    g.add_argument("--draft", help="draft checkpoint dir (in-process)")
    g.add_argument("--mode", choices=["ar", "sd", "ssd"], default=None)
    g.add_argument("--k", type=int, default=None)
    g.add_argument("--address", default=None, help="Ray address (auto joins a running cluster)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.add_argument("--token-env", default=None, help="env var holding the server's bearer token (--server)")
    g.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server's certificate")
    _sampling_args(g)

    s = sub.add_parser("serve", help="serve gRPC until SIGTERM")
    s.add_argument("--config", "-c", default="configs/local-cpu.yaml")
    s.add_argument("--address", default=None)
    s.add_argument("--port", type=int, default=None)

    bench = sub.add_parser("bench", help="AR vs SD vs SSD vs HF, side by side")
    bench.add_argument("--config", "-c", default="configs/bench-cpu.yaml")
    bench.add_argument("--out", default="bench-out")
    bench.add_argument("--quick", action="store_true", help="few prompts and tokens (a smoke run)")
    bench.add_argument("--explore", action="store_true",
                       help="SSD only, over a grid of drafters x K x fan-out budgets (below); keeps no HF or SD")
    bench.add_argument("--drafts", type=_csv(str), default=None, metavar="PATH,...",
                       help="--explore: drafter checkpoints or demo:<size>/draft-<L>x<D> (default: the config's)")
    bench.add_argument("--ks", type=_csv(int), default=None, metavar="K,...", help="--explore: K values")
    bench.add_argument("--budgets", type=_csv(int), default=None, metavar="N,...",
                       help="--explore: fan-out budgets (branches per round)")
    bench.add_argument("--concurrency", type=_csv(int), default=None, metavar="N,...",
                       help="throughput and latency at N concurrent streams (e.g. 1,4,8) for --modes")
    bench.add_argument("--modes", type=_csv(str), default=["ar", "sd", "ssd"], metavar="MODE,...",
                       help="--concurrency: the modes to sweep (default ar,sd,ssd)")
    bench.add_argument("--replicas", type=_csv(int), default=None, metavar="R,...",
                       help="--concurrency through a served endpoint with cluster.replicas R (e.g. 1,2): aggregate "
                            "tokens/s, p50/p99 latency and host CPU per point, in the config's mode")
    bench.add_argument("--draft-replicas", type=_csv(int), default=None, metavar="M,...",
                       help="--concurrency through a served endpoint with models.draft.replicas M (e.g. 1,2): as "
                            "--replicas, with the speculation table's hit rate")
    bench.add_argument("--compile", action="store_true",
                       help="engine.compile off against on: forward times and AR/SD/SSD tokens/s, interleaved")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        if args.cmd == "models":
            from cluster.models.build import cli_build

            if (args.head or args.budget is not None) and args.size != "smol":
                raise ValueError("--head and --budget are for --size smol (the draft head)")
            print(cli_build(args.size, args.out, args.force, args.budget, args.head or args.budget is not None))
            return 0
        if args.cmd == "generate":
            from cluster.generate_cmd import run_generate

            return run_generate(args)
        if args.cmd == "serve":
            from cluster.serving.server import serve_from_config

            overrides = {"cluster.address": args.address} if args.address else {}
            if args.port is not None:
                overrides["server.port"] = args.port
            return serve_from_config(args.config, overrides)
        if args.cmd == "bench":
            if args.explore:
                from cluster.bench.explore import run_explore

                return run_explore(args.config, args.out, args.drafts, args.ks, args.budgets, quick=args.quick)
            if args.drafts or args.ks or args.budgets:
                raise ValueError("--drafts, --ks and --budgets belong to --explore")
            if args.compile:
                from cluster.bench.compile import run as run_compile_ab

                return run_compile_ab(args.config, args.out, 2 if args.quick else 6, 16 if args.quick else 64)
            if (args.replicas or args.draft_replicas) and not args.concurrency:
                raise ValueError("--replicas and --draft-replicas need --concurrency (e.g. --concurrency 1,8 "
                                 "--replicas 1,2)")
            if args.concurrency and (args.replicas or args.draft_replicas):
                from cluster.bench.replicas import run as run_replicas

                return run_replicas(args.config, args.out, args.replicas or [1], args.concurrency,
                                    new=16 if args.quick else 64, runs=1 if args.quick else 2,
                                    drafters=args.draft_replicas or [1])
            if args.concurrency:
                from cluster.bench.paged import run_concurrency

                return run_concurrency(args.config, args.out, args.concurrency, args.modes,
                                       new=16 if args.quick else 64, runs=1 if args.quick else 2)
            from cluster.bench.run import run_bench

            return run_bench(args.config, args.out, quick=args.quick)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        # Bad input is the user's to fix: one clear line, no traceback.
        log.error("%s", e)
        return 2
    except Exception as e:  # the environment failed us (Ray did not start, a port is taken, ...)
        log.debug("details", exc_info=True)
        log.error("%s failed: %s: %s (run with --log-level DEBUG for the traceback)", args.cmd,
                  type(e).__name__, e)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
