"""The outrider.v1.Outrider gRPC service: Generate (server streaming), Abort, GetInfo.

Requests are parsed here rather than by the generated stub, so a malformed message (invalid
UTF-8, truncated bytes) is INVALID_ARGUMENT like any other bad input instead of gRPC's generic
INTERNAL "exception deserializing request".
"""
from __future__ import annotations

import logging
import platform
import sys

import grpc
from google.protobuf.message import DecodeError

from actors.spec.stats import SpecStats
from cluster.serving.coordinator import Chunk, Coordinator, EngineUnavailable, Final, QueueFull
from cluster.serving.metrics import Metrics
from cluster.rpc.outrider.v1 import outrider_pb2 as pb
from cluster.serving.validate import InvalidRequest, Limits, to_generate_args

log = logging.getLogger(__name__)
SERVICE = "outrider.v1.Outrider"


class _Malformed:
    def __init__(self, error: str):
        self.error = error


def _parser(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError) as e:  # never let a client's bytes become INTERNAL
            return _Malformed(str(e) or "cannot parse the request")
    return parse


def stats_pb(s: SpecStats, ttft_s: float, completion: int, total_s: float) -> pb.SpecStats:
    return pb.SpecStats(
        drafts=s.drafts, draft_tokens=s.draft_tokens, accepted_tokens=s.accepted_tokens,
        acceptance_rate=s.acceptance_rate, mean_acceptance_length=s.mean_acceptance_length,
        accepted_per_position=list(s.accepted_per_position), cache_hits=s.cache_hits,
        cache_misses=s.cache_misses, hit_rate=s.hit_rate, hits_by_depth=list(s.hits_by_depth),
        time_to_first_token_s=ttft_s, tokens_per_s=completion / total_s if total_s > 0 else 0.0,
        k_histogram=list(s.k_histogram), rounds_off=s.rounds_off, fixed_k=s.fixed_k)


def logprobs_pb(chunk: Chunk) -> list[pb.TokenLogprob]:
    if not chunk.logprobs:
        return []
    return [pb.TokenLogprob(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in top])
            for t, (lp, top) in zip(chunk.token_ids, chunk.logprobs)]


class OutriderService:
    def __init__(self, tok, limits: Limits, info: pb.GetInfoResponse, metrics: Metrics | None = None):
        self.tok, self.limits, self.info, self.metrics = tok, limits, info, metrics
        self.coord: Coordinator | None = None   # set once the engine is up (or rebuilt)
        self.unavailable = "the engine is starting"

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, request_deserializer=_parser(pb.GenerateRequest),
                response_serializer=pb.GenerateResponse.SerializeToString),
            "Abort": grpc.unary_unary_rpc_method_handler(
                self.Abort, request_deserializer=_parser(pb.AbortRequest),
                response_serializer=pb.AbortResponse.SerializeToString),
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.GetInfo, request_deserializer=_parser(pb.GetInfoRequest),
                response_serializer=pb.GetInfoResponse.SerializeToString),
        })

    def _fail(self, context, code: grpc.StatusCode, message: str):
        if self.metrics is not None:
            self.metrics.errors.labels(code.name).inc()
        context.abort(code, message)

    # -- RPCs ----------------------------------------------------------------------------------
    def Generate(self, request, context):
        if isinstance(request, _Malformed):
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed GenerateRequest: {request.error}")
        if self.coord is None:
            self._fail(context, grpc.StatusCode.UNAVAILABLE, self.unavailable)
        remaining = context.time_remaining()
        if remaining is not None and remaining > 1e7:  # no deadline: gRPC reports a near-infinite one
            remaining = None
        try:
            args = to_generate_args(request, self.tok, self.limits, deadline_s=remaining)
        except InvalidRequest as e:
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if args.request_id and self.coord.find(args.request_id) is not None:
            self._fail(context, grpc.StatusCode.ALREADY_EXISTS, f"request_id {args.request_id!r} is already running")
        try:
            handle = self.coord.submit(args)
        except QueueFull as e:
            self._fail(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailable as e:
            self._fail(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:  # the engine's own checks, should validation ever miss one
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        # A client that cancels, disconnects or runs out of deadline frees its sequence at once.
        context.add_callback(lambda: None if handle.done else handle.cancel())
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            yield from self._stream(handle, context)
        finally:
            if self.metrics is not None:
                self.metrics.in_flight.dec()

    def _stream(self, handle, context):
        for item in handle:
            if isinstance(item, Chunk):
                yield pb.GenerateResponse(chunk=pb.Chunk(token_ids=item.token_ids, text=item.text,
                                                         logprobs=logprobs_pb(item)))
                continue
            final: Final = item
            if final.error:
                self._fail(context, grpc.StatusCode.UNAVAILABLE, final.error)
            if final.finish_reason == "deadline":
                self._fail(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"deadline exceeded after {final.completion_tokens} tokens")
            if self.metrics is not None:
                self.metrics.observe_final(final.finish_reason, final.prompt_tokens, final.completion_tokens,
                                           final.stats, final.ttft_s, final.total_s)
            yield pb.GenerateResponse(final=pb.Final(
                finish_reason=final.finish_reason, request_id=handle.request_id,
                usage=pb.Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens),
                stats=stats_pb(final.stats, final.ttft_s, final.completion_tokens, final.total_s)))

    def Abort(self, request, context):
        if isinstance(request, _Malformed):
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, f"malformed AbortRequest: {request.error}")
        if not request.request_id:
            self._fail(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is empty")
        if self.coord is None:
            self._fail(context, grpc.StatusCode.UNAVAILABLE, self.unavailable)
        h = self.coord.find(request.request_id)
        if h is not None:
            h.cancel()
        return pb.AbortResponse(found=h is not None)

    def GetInfo(self, request, context):
        return self.info


def info_for(spec, cfg) -> pb.GetInfoResponse:
    import google.protobuf
    import torch

    from cluster import __version__

    # A `launcher: local` server runs without Ray (and may have none installed): no version then.
    ray = sys.modules.get("ray") if cfg.cluster.launcher == "local" else __import__("ray")
    versions = {"outrider": __version__, "torch": torch.__version__, "grpc": grpc.__version__,
                "protobuf": google.protobuf.__version__, "python": platform.python_version()}
    if ray is not None:
        versions["ray"] = ray.__version__

    return pb.GetInfoResponse(
        target_model=cfg.models.target.path, draft_model=cfg.models.draft.path if spec.draft else "",
        mode=spec.mode, k=spec.k, fan_out=list(spec.fan_out or []), fan_out_budget=spec.fan_out_budget,
        backup=spec.backup, saguaro_c=spec.saguaro_c, max_seq_len=spec.max_seq_len,
        max_new_tokens_limit=cfg.server.max_new_tokens_limit,
        versions=versions)
