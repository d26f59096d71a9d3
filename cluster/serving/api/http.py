"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

It runs beside gRPC in the serving process (uvicorn on a thread of its own) over the same
coordinator, limits and bearer token. A request becomes the same GenerateRequest a gRPC client
sends (cluster/serving/api/openai_schema.py) and goes through the same validation; its events come from
the coordinator's poller thread into the event loop through `call_soon_threadsafe`, so a stream
holds no thread while it waits. A client that goes away mid-stream frees its sequence on both
actors (the stream's generator is closed and cancels the request).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.serving.api.logprobs import LogprobsShape
from cluster.serving.api.openai_schema import (APIError, ChatBody, CompletionBody, forced_call, param_of, parse,
                                               to_request)
from cluster.serving.api.tools import ToolCalls
from cluster.serving.coordinator import Chunk, EngineUnavailable, Final, QueueFull
from cluster.serving.validate import InvalidRequest, to_generate_args

log = logging.getLogger(__name__)
FINISH = {"length": "length", "stop": "stop", "eos": "stop", "abort": "abort", "deadline": "length"}
GRPC_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT",
             429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


class _LoopSink:
    """Coordinator events -> an asyncio.Queue, from the poller thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def spec_stats(final: Final) -> dict:
    s = final.stats
    return {"speculative_decoding": {
        "drafts": s.drafts, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
        "acceptance_rate": s.acceptance_rate, "mean_acceptance_length": s.mean_acceptance_length,
        "cache_hits": s.cache_hits, "cache_misses": s.cache_misses, "hit_rate": s.hit_rate,
        "k_histogram": list(s.k_histogram), "rounds_off": s.rounds_off, "fixed_k": s.fixed_k}}


def usage(final: Final) -> dict:
    # prompt_tokens_details.cached_tokens: OpenAI's field for a prompt-cache hit (actors/kv/prefix.py)
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens}}


def build_app(service, model_name: str, token: str | None, max_body_bytes: int) -> FastAPI:
    """`service` is the server's OutriderService: its coord, tok, limits and metrics are shared."""
    app = FastAPI(title="outrider", docs_url=None, redoc_url=None, openapi_url=None)

    def fail(e: APIError) -> JSONResponse:
        if service.metrics is not None:
            service.metrics.errors.labels(GRPC_CODE.get(e.status, str(e.status))).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return fail(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):  # a bug must still answer in OpenAI's shape
        log.exception("HTTP request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    def check_token(request: Request) -> None:
        if token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            raise APIError(401, "missing or wrong bearer token", code="invalid_api_key")

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"the body is {size} bytes; the limit is {max_body_bytes} (http.max_body_bytes)")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                raise APIError(413, f"the body exceeds {max_body_bytes} bytes (http.max_body_bytes)")
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None

    @app.get("/health")
    async def health():
        if service.coord is None or service.coord.draining or service.coord.error:
            return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
        return {"status": "SERVING"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_token(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "outrider", "max_model_len": service.limits.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionBody, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatBody, chat=True)

    async def generate(request: Request, cls, chat: bool):
        check_token(request)
        body = parse(cls, await read_json(request))
        if body.model is not None and body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        coord = service.coord
        if coord is None:
            raise APIError(503, service.unavailable)
        call = forced_call(body)
        try:
            args = to_generate_args(to_request(body, call), service.tok, service.limits)
        except InvalidRequest as e:
            raise APIError(400, str(e), param=param_of(str(e))) from None
        sink = _LoopSink(asyncio.get_running_loop())
        try:
            handle = coord.submit(args, events=sink)
        except QueueFull as e:
            raise APIError(429, str(e), code="rate_limit_exceeded") from None
        except EngineUnavailable as e:
            raise APIError(503, str(e)) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(rid, model_name, chat,
                       LogprobsShape(service.tok, chat) if args.logprobs is not None else None, call)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(service, handle, sink, shape, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _whole(service, request, handle, sink, shape)

    return app


class _Shape:
    """OpenAI's response objects for one request (completion or chat)."""

    def __init__(self, rid: str, model: str, chat: bool, logprobs: LogprobsShape | None = None,
                 call: ToolCalls | None = None):
        self.rid, self.model, self.chat, self.created = rid, model, chat, int(time.time())
        self.logprobs = logprobs   # None: the request asked for none ("logprobs": null)
        self.call = call           # a forced function call: the answer goes out as tool_calls

    def _lps(self, chunks: list[Chunk]) -> dict | None:
        if self.logprobs is None:
            return None
        return self.logprobs.of([t for c in chunks for t in c.token_ids],
                                [e for c in chunks for e in (c.logprobs or [])])

    def _envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, chunks: list[Chunk], final: Final) -> dict:
        reason = FINISH.get(final.finish_reason, final.finish_reason)
        text, lps = "".join(c.text for c in chunks), self._lps(chunks)
        calls = self.call.calls(text) if self.call is not None else None
        if calls:
            choice = {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": calls},
                      "logprobs": lps, "finish_reason": "tool_calls"}
        elif self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": reason}
        out = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        out["usage"], out["metrics"] = usage(final), spec_stats(final)
        return out

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False,
              item: Chunk | None = None, calls: list[dict] | None = None) -> dict:
        lps = self._lps([item]) if item is not None else None
        if calls:   # a forced call streams as one delta, once its arguments are complete
            delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}
        elif self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lps, "finish_reason": reason}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, final: Final) -> dict:
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(final)
        return out


def _merged(chunks: list[Chunk]) -> Chunk:
    return Chunk([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                 [e for c in chunks for e in (c.logprobs or [])] if any(c.logprobs for c in chunks) else None)


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _observe(service, final: Final) -> None:
    if service.metrics is not None:
        service.metrics.observe_final(final.finish_reason, final.prompt_tokens, final.completion_tokens,
                                      final.stats, final.ttft_s, final.total_s)


async def _whole(service, request: Request, handle, sink: _LoopSink, shape: _Shape):
    parts, final = [], None
    try:
        while final is None:
            try:
                item = await asyncio.wait_for(sink.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():  # nobody to answer: free the sequence
                    handle.cancel()
                continue
            if isinstance(item, Chunk):
                parts.append(item)
            else:
                final = item
    finally:
        if final is None and not handle.done:
            handle.cancel()
    if final.error:
        raise APIError(503, final.error)
    _observe(service, final)
    return shape.whole(parts, final)


async def _sse(service, handle, sink: _LoopSink, shape: _Shape, include_usage: bool):
    if service.metrics is not None:
        service.metrics.in_flight.inc()
    try:
        if shape.chat:
            yield _data(shape.chunk(None, first=True))
        held = []   # a forced call's answer: sent whole at the end, as tool_calls
        while True:
            item = await sink.queue.get()
            if isinstance(item, Chunk):
                if shape.call is not None:
                    held.append(item)
                # A chunk whose tokens have no text yet (part of a character) still carries their logprobs.
                elif item.text or (shape.logprobs is not None and item.token_ids):
                    yield _data(shape.chunk(item.text, item=item))
                continue
            final: Final = item
            if final.error:
                yield _data(APIError(503, final.error).body())
                break
            _observe(service, final)
            reason = FINISH.get(final.finish_reason, final.finish_reason)
            if held:
                text = "".join(c.text for c in held)
                calls = shape.call.calls(text)
                yield _data(shape.chunk(text, item=_merged(held), calls=calls))
                reason = "tool_calls" if calls else reason
            last = shape.chunk(None, reason)
            last["metrics"] = spec_stats(final)
            yield _data(last)
            if include_usage:
                yield _data(shape.usage_chunk(final))
            yield "data: [DONE]\n\n"
            break
    finally:  # also when the client went away: the generator is closed, the request cancelled
        if not handle.done:
            handle.cancel()
        if service.metrics is not None:
            service.metrics.in_flight.dec()


class HTTPServer:
    """uvicorn on a socket bound here (port 0 = any free port, read back at once), in a thread."""

    def __init__(self, app: FastAPI, host: str, port: int, tls: tuple[str, str] | None = None):
        """`tls` = (cert_file, key_file): HTTPS with the gRPC server's own certificate."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise RuntimeError(f"http.port: cannot bind {host}:{port} ({e.strerror})") from None
        self.sock.listen(128)
        self.host, self.port = host, self.sock.getsockname()[1]
        cert, key = tls or (None, None)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=1, ssl_certfile=cert, ssl_keyfile=key))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="outrider-http", daemon=True)

    def start(self) -> HTTPServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()
