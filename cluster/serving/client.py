"""A small Python client for outrider's gRPC API.

    with OutriderClient("127.0.0.1:50051") as client:
        for text in client.stream_text("def main():", max_new_tokens=64):
            print(text, end="")
        text, final = client.generate_text("def main():", max_new_tokens=64)
        # a chat: rendered by the server with the checkpoint's chat template
        text, final = client.generate_text([{"role": "user", "content": "Hi!"}], max_new_tokens=64)
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.rpc.outrider.v1 import outrider_pb2 as pb
from cluster.rpc.outrider.v1 import outrider_pb2_grpc as pb_grpc


class OutriderClient:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, server_name: str | None = None):
        """`target` is HOST:PORT. `token` sends a bearer token; `tls`/`root_certificates` (PEM) turn
        on TLS; `server_name` overrides the name checked against the certificate."""
        if tls or root_certificates is not None:
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self.channel = grpc.insecure_channel(target)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.OutriderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> OutriderClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def request(prompt: str | list[int] | list[dict], max_new_tokens: int | None = None, temperature: float = 0.0,
                top_k: int = 0, top_p: float | None = None, seed: int | None = None,
                stop: list[str] | tuple[str, ...] = (), stop_token_ids: list[int] | tuple[int, ...] = (),
                request_id: str = "", disable_speculation: bool = False,
                ignore_eos: bool = False, k: int | None = None, logprobs: int | None = None,
                structured: pb.StructuredOutput | None = None) -> pb.GenerateRequest:
        req = pb.GenerateRequest(temperature=temperature, top_k=top_k, stop=list(stop),
                                 stop_token_ids=list(stop_token_ids), request_id=request_id,
                                 disable_speculation=disable_speculation, ignore_eos=ignore_eos)
        if isinstance(prompt, str):
            req.prompt = prompt
        elif prompt and isinstance(prompt[0], dict):  # chat messages
            req.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt)
        else:
            req.prompt_ids.ids.extend(prompt)
        if max_new_tokens is not None:
            req.max_new_tokens = max_new_tokens
        if top_p is not None:
            req.top_p = top_p
        if seed is not None:
            req.seed = seed
        if k is not None:  # this request's draft length (0 = no speculation); unset: the server's policy
            req.k = k
        if logprobs is not None:  # each token's logprob and the `logprobs` most likely at its position
            req.logprobs = logprobs
        if structured is not None:  # the output must match it: a JSON schema, regex, grammar or choice
            req.structured.CopyFrom(structured)
        return req

    def generate(self, prompt: str | list[int], timeout: float | None = None, **kw):
        """Stream GenerateResponse messages (chunks, then one final). Cancel with `.cancel()` on the
        returned iterator."""
        return self.stub.Generate(self.request(prompt, **kw), timeout=timeout, metadata=self.metadata)

    def stream_text(self, prompt: str | list[int], **kw):
        for item in self.generate(prompt, **kw):
            if item.HasField("chunk"):
                yield item.chunk.text

    def generate_text(self, prompt: str | list[int], **kw) -> tuple[str, pb.Final]:
        """Run to the end; return the full text and the Final message."""
        chunks, final = self._collect(prompt, **kw)
        return "".join(c.text for c in chunks), final

    def generate_ids(self, prompt: str | list[int], **kw) -> tuple[list[int], pb.Final]:
        chunks, final = self._collect(prompt, **kw)
        return [t for c in chunks for t in c.token_ids], final

    def _collect(self, prompt, **kw):
        chunks, final = [], None
        for item in self.generate(prompt, **kw):
            if item.HasField("chunk"):
                chunks.append(item.chunk)
            else:
                final = item.final
        return chunks, final

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), metadata=self.metadata).found

    def info(self) -> pb.GetInfoResponse:
        return self.stub.GetInfo(pb.GetInfoRequest(), metadata=self.metadata)

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN, as a name."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until the server reports SERVING (it opens its port before the models load)."""
        import time

        end = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=2.0) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"server not SERVING after {timeout}s")
            time.sleep(0.2)
