"""A tiny stand-in replica for API server tests: a grpc.aio server on port 0.

ModelInfer echoes: the response has the request's id and model name, an output
``replica`` naming this replica, ``visited`` (the hop list it received),
``capability`` (the x-capability-* metadata it received), and the request's
inputs echoed back (raw in, raw out). ModelStreamInfer sends ``chunks``
responses per request (``text_output`` = ``chunk-<i>``), optionally slowly,
optionally replacing chunk ``error_after`` by an in-band error, and records
whether the call was cancelled. ``delegate_to`` makes it send every unary
request back through the API server's gRPC entry as a delegation instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import grpc
import grpc.aio
import httpx

from anyserve import rpc
from anyserve.api_server.server import ApiServer, ApiServerConfig
from anyserve.codec import pack_raw
from anyserve.errors import HandlerError, to_stream_error
from anyserve.proto import (
    InferParameter,
    ModelInferRequest,
    ModelInferResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
    ModelStreamInferResponse,
)

Context = Any  # grpc.aio.ServicerContext (grpc is untyped here)


class FakeReplica:
    def __init__(
        self,
        replica_id: str,
        capabilities: list[dict[str, Any]],
        *,
        loadable: list[dict[str, Any]] | None = None,
        chunks: int = 3,
        chunk_delay: float = 0.0,
        first_delay: float = 0.0,
        error_after: int | None = None,
        error: tuple[grpc.StatusCode, str] | None = None,
        unary_delay: float = 0.0,
        delegate_to: str | None = None,
        port: int = 0,
    ) -> None:
        self.replica_id = replica_id
        self.capabilities = capabilities
        self.loadable = loadable or []
        self.chunks = chunks
        self.chunk_delay = chunk_delay
        self.first_delay = first_delay
        self.error_after = error_after
        self.error = error
        self.unary_delay = unary_delay
        self.delegate_to = delegate_to
        self.port = port
        self.calls = 0
        self.metadata: list[dict[str, str]] = []
        self.deadlines: list[float | None] = []  # seconds left when each call arrived
        self.cancelled = anyio.Event()
        self.stream_started = anyio.Event()
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def registration(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "endpoint": self.endpoint,
            "capabilities": self.capabilities,
            "loadable": self.loadable,
            "workers": [{"id": f"{self.replica_id}-w0", "state": "running"}],
        }

    async def __aenter__(self) -> FakeReplica:
        server = grpc.aio.server()
        methods = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self._infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self._stream),
            "ModelReady": grpc.unary_unary_rpc_method_handler(self._ready),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(self._metadata),
        }
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(rpc.SERVICE, methods)]
        )
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    # ------------------------------------------------------------------ helpers

    def _record(self, context: Context) -> dict[str, str]:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        self.metadata.append(md)
        self.deadlines.append(context.time_remaining())
        self.calls += 1
        return md

    def _echo(self, request: ModelInferRequest, md: dict[str, str]) -> ModelInferResponse:
        caps = ",".join(
            f"{k.removeprefix('x-capability-')}={v}"
            for k, v in sorted(md.items())
            if k.startswith("x-capability-")
        )
        extra = {
            "replica": self.replica_id,
            "visited": md.get(rpc.VISITED, ""),
            "capability": caps,
        }
        response = ModelInferResponse(id=request.id, model_name=request.model_name)
        response.parameters[rpc.SERVED_BY].CopyFrom(InferParameter(string_param=self.replica_id))
        raw = bool(request.raw_input_contents)
        for index, tensor in enumerate(request.inputs):
            out = response.outputs.add(name=tensor.name, datatype=tensor.datatype)
            out.shape.extend(tensor.shape)
            if raw:
                response.raw_output_contents.append(request.raw_input_contents[index])
            else:
                out.contents.CopyFrom(tensor.contents)
        for name, text in extra.items():
            out = response.outputs.add(name=name, datatype="BYTES", shape=[1])
            if raw:
                response.raw_output_contents.append(pack_raw("BYTES", [text.encode()], name))
            else:
                out.contents.bytes_contents.append(text.encode())
        return response

    async def _delegate(self, request: bytes, md: dict[str, str], context: Context) -> bytes:
        assert self.delegate_to is not None
        visited = [v for v in md.get(rpc.VISITED, "").split(",") if v]
        visited.append(self.replica_id)
        out_md = [(k, v) for k, v in md.items() if k.startswith("x-capability-")]
        out_md += [
            (rpc.DELEGATED_FROM, self.replica_id),
            (rpc.VISITED, ",".join(visited)),
            (rpc.REQUEST_ID, md.get(rpc.REQUEST_ID, "")),
        ]
        async with grpc.aio.insecure_channel(self.delegate_to) as channel:
            call = channel.unary_unary(rpc.MODEL_INFER, None, None)
            try:
                answer = await call(request, metadata=out_md, timeout=5)
            except grpc.aio.AioRpcError as exc:
                # Relayed as a replica does: the class rides in the trailers.
                await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata()))
        assert isinstance(answer, bytes)
        return answer

    # ------------------------------------------------------------------ methods

    async def _infer(self, request: bytes, context: Context) -> bytes:
        md = self._record(context)
        if self.unary_delay:
            await asyncio.sleep(self.unary_delay)
        if self.error is not None:
            await context.abort(*self.error)
        if self.delegate_to is not None:
            return await self._delegate(request, md, context)
        return self._echo(ModelInferRequest.FromString(request), md).SerializeToString()

    async def _stream(self, requests: AsyncIterator[bytes], context: Context) -> None:
        md = self._record(context)
        self.stream_started.set()
        batched = md.get(rpc.BATCH) == "1"

        async def write(message: bytes) -> None:
            # Like a real replica: one response per batch when the API server asks.
            await context.write(rpc.pack_batch([message]) if batched else message)

        try:
            async for raw in requests:
                request = ModelInferRequest.FromString(raw)
                if self.error is not None:
                    await context.abort(*self.error)
                if self.first_delay:
                    await asyncio.sleep(self.first_delay)
                for index in range(self.chunks):
                    if self.error_after is not None and index == self.error_after:
                        await write(self._stream_error(request))
                        break
                    if index and self.chunk_delay:
                        await asyncio.sleep(self.chunk_delay)
                    response = self._echo(request, md)
                    text = response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
                    text.contents.bytes_contents.append(f"chunk-{index}".encode())
                    message = ModelStreamInferResponse(infer_response=response)
                    await write(message.SerializeToString())
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def _stream_error(self, request: ModelInferRequest) -> bytes:
        return to_stream_error(HandlerError("boom"), request.id, request.model_name)

    async def _ready(self, request: bytes, context: Context) -> bytes:
        self._record(context)
        return ModelReadyResponse(ready=True).SerializeToString()

    async def _metadata(self, request: bytes, context: Context) -> bytes:
        self._record(context)
        response = ModelMetadataResponse(name=self.replica_id, platform="fake")
        response.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        return response.SerializeToString()


# ---------------------------------------------------------------------- test helpers


@asynccontextmanager
async def running_api(**overrides: Any) -> AsyncIterator[ApiServer]:
    """An ApiServer on free ports (HTTP and gRPC), stopped on exit."""
    settings: dict[str, Any] = {"port": 0, "grpc_port": 0, "token": None, **overrides}
    config = ApiServerConfig(**settings)
    async with ApiServer(config) as server:
        yield server


async def register(http: httpx.AsyncClient, *replicas: FakeReplica) -> None:
    for replica in replicas:
        response = await http.post("/register", json=replica.registration())
        assert response.status_code == 200, response.text
