"""`outrider generate`: one prompt, three ways to run it (in-process, Ray cluster, gRPC server)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import grpc

from actors.spec.sampling import SamplingParams
from actors.spec.stats import SpecStats

log = logging.getLogger(__name__)


def _params(args) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed).validate()


def _report(args, text: str, reason: str, n_tokens: int, stats: SpecStats, seconds: float, mode: str) -> None:
    if args.json:
        print(json.dumps({"text": text, "finish_reason": reason, "completion_tokens": n_tokens, "mode": mode,
                          "seconds": round(seconds, 4), "stats": stats.to_dict()}))
        return
    print(text)
    rate = n_tokens / seconds if seconds > 0 else 0.0
    print(f"\n--- {mode}: {n_tokens} tokens in {seconds:.2f}s ({rate:.1f} tok/s), finish={reason}", file=sys.stderr)
    if stats.drafts:
        print(f"--- {stats.summary()}", file=sys.stderr)
        print(f"--- accepted per position {stats.accepted_per_position}, hits by depth {stats.hits_by_depth}",
              file=sys.stderr)


def run_generate(args) -> int:
    prompt = args.prompt if args.prompt is not None else args.prompt_pos
    if args.chat is not None:
        if prompt:
            raise ValueError("give either a prompt or --chat, not both")
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.chat}]
    elif args.system is not None:
        raise ValueError("--system goes with --chat")
    if not prompt:
        raise ValueError("give a prompt (positional or --prompt) or a chat message (--chat)")
    if args.server:
        return _via_server(args, prompt)
    if args.target:
        return _in_process(args, prompt)
    return _via_cluster(args, prompt)


def _encode(tok, prompt: str | list[dict]) -> list[int]:
    """Text is encoded as is; chat messages go through the checkpoint's chat template."""
    return tok.encode_chat(prompt) if isinstance(prompt, list) else tok.encode(prompt)


def _in_process(args, prompt: str | list[dict]) -> int:
    from actors.generate import generate_ar, generate_sd
    from actors.model.loader import load_model
    from actors.spec.stopping import StopCriteria
    from actors.model.tokenizer import Tokenizer

    mode = args.mode or ("sd" if args.draft else "ar")
    if mode == "ssd":
        raise ValueError("--mode ssd needs the cluster: use --config (in-process runs ar or sd)")
    tok = Tokenizer(args.target)
    target = load_model(args.target)
    ids = _encode(tok, prompt)
    stop = StopCriteria(args.max_new_tokens, frozenset(target.args.eos_token_ids), tuple(args.stop))
    if mode == "sd":
        if not args.draft:
            raise ValueError("--mode sd needs --draft")
        k = 4 if args.k is None else args.k
        g = generate_sd(target, load_model(args.draft), ids, stop, k, _params(args), tok.decode)
    else:
        g = generate_ar(target, ids, stop, _params(args), tok.decode)
    _report(args, g.text, g.finish_reason, len(g.tokens), g.stats, g.elapsed_s, mode)
    return 0


def _via_cluster(args, prompt: str | list[dict]) -> int:
    from cluster.config import load_config
    from cluster.serving.coordinator import Coordinator, GenerateArgs
    from cluster.launch.deployment import engine_spec, start_engine, tokenizer_for

    overrides = {}
    if args.mode:
        overrides["speculation.mode"] = args.mode
    if args.k is not None:
        overrides["speculation.k"] = args.k
    if args.address:
        overrides["cluster.address"] = args.address
    cfg = load_config(args.config or "configs/local-cpu.yaml", overrides)
    spec = engine_spec(cfg)
    tok = tokenizer_for(spec)
    engine = start_engine(cfg, spec)
    coord = Coordinator(engine, tok, cfg.server.max_queue)
    try:
        ids = _encode(tok, prompt)
        before, t0 = engine.metrics(), time.perf_counter()
        final = coord.generate(GenerateArgs(ids, args.max_new_tokens, _params(args), tuple(args.stop)))
        after, window = engine.metrics(), time.perf_counter() - t0
        _report(args, final.text, final.finish_reason, final.completion_tokens, final.stats,
                final.total_s, spec.mode)
        _report_engine(before, after, window)
    finally:
        coord.stop()
        engine.stop()
    return 0


def _report_engine(m0: dict, m1: dict, seconds: float) -> None:
    """Where the request's time went: idle fractions and per-round transport (metric deltas)."""
    d = {k: m1[k] - m0[k] for k in ("steps", "verify_s", "wait_s", "transport_s", "idle_s")}
    steps, total = max(d["steps"], 1), max(seconds, 1e-9)
    line = (f"verifier busy verifying {d['verify_s'] / total:.0%}, idle {(d['wait_s'] + d['idle_s']) / total:.0%} "
            f"(waiting on drafts {d['wait_s'] / total:.0%}); transport {d['transport_s'] / steps * 1000:.2f} ms/round")
    if m0.get("drafter") and m1.get("drafter"):
        line += f"; drafter idle {(m1['drafter']['wait_s'] - m0['drafter']['wait_s']) / total:.0%}"
    print(f"--- {line}", file=sys.stderr)


def _via_server(args, prompt: str | list[dict]) -> int:
    from cluster.serving.client import OutriderClient

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env: environment variable {args.token_env!r} is not set")
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    with OutriderClient(args.server, token=token, root_certificates=ca) as client:
        try:
            final = _stream_from(client, args, prompt)
        except grpc.RpcError as e:  # a refusal is the server's answer, not a crash
            log.error("server answered %s: %s", e.code().name, e.details())
            return 1
    s = final.stats
    log.info("finish=%s tokens=%d acceptance=%.2f mean_len=%.2f hit_rate=%.2f ttft=%.3fs %.1f tok/s",
             final.finish_reason, final.usage.completion_tokens, s.acceptance_rate, s.mean_acceptance_length,
             s.hit_rate, s.time_to_first_token_s, s.tokens_per_s)
    return 0


def _stream_from(client, args, prompt: str | list[dict]):
    final, parts = None, []
    for item in client.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                k=args.k):  # --k with --server: this request's own K (0 = off)
        if item.HasField("chunk"):
            parts.append(item.chunk.text)
            if not args.json:
                print(item.chunk.text, end="", flush=True)
        else:
            final = item.final
    if args.json:
        print(json.dumps({"text": "".join(parts), "finish_reason": final.finish_reason,
                          "completion_tokens": final.usage.completion_tokens,
                          "acceptance_rate": final.stats.acceptance_rate, "hit_rate": final.stats.hit_rate}))
    else:
        print()
    return final
