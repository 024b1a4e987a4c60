"""The replica's ``inference.GRPCInferenceService`` methods (KServe v2).

Inference payloads stay serialized bytes: the dispatcher routes them without
parsing. Health and metadata methods answer from the manager's view of its
workers. A failed request on a ``ModelStreamInfer`` stream is reported in-band
(Triton's convention) and the stream stays open for the others.

``ModelMetadata`` and ``ModelConfig`` describe one handler: the one the
capability metadata (``x-capability-*``) would route a request to, else the
one the model name addresses (the dispatcher's resolution; a unary handler
before a streaming one). Its declared ``inputs``/``outputs`` are listed, and
the config is Triton's (:func:`~anyserve.replica.status.model_config`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import grpc
import grpc.aio

from anyserve import __version__, rpc, tracing_servers, versions
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.app import HandlerInfo
from anyserve.capability import query_from_headers, rank
from anyserve.errors import (
    AnyServeError,
    DeadlineExceeded,
    NotFound,
    grpc_method,
    to_stream_error,
)
from anyserve.logs import access, call_line
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.in_flight import CANCELLED_DETAILS, CancelledByCaller, InFlight
from anyserve.replica.manager import Manager
from anyserve.replica.slot import State
from anyserve.replica.status import model_config, repository_index, tensor_metadata


class InferenceServicer:
    """gRPC method handlers; payloads stay bytes on the inference path."""

    def __init__(
        self,
        handlers: list[HandlerInfo],
        manager: Manager,
        dispatcher: Dispatcher,
        in_flight: InFlight | None = None,
    ) -> None:
        self.handlers = handlers
        self.manager = manager
        self.dispatcher = dispatcher
        self.in_flight = in_flight if in_flight is not None else InFlight()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def typed(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                tracing_servers.grpc_method(self.model_infer, "dispatch ModelInfer")
            ),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                tracing_servers.grpc_method(self.model_stream_infer, "dispatch ModelStreamInfer")
            ),
            "ServerLive": typed(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": typed(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": typed(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": typed(
                self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": typed(
                self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelConfig": typed(self.model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
            "RepositoryIndex": typed(
                self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse
            ),
        }
        return grpc.method_handlers_generic_handler(rpc.SERVICE, handlers)

    @grpc_method
    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata, call_id, _ = rpc.read_hop(context.invocation_metadata())
        try:
            return await self.in_flight.run(
                call_id, infer(self.dispatcher, request, metadata, _time_left(context))
            )
        except CancelledByCaller:
            await context.abort(grpc.StatusCode.CANCELLED, CANCELLED_DETAILS)
            raise  # abort raised already

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        metadata, call_id, batched = rpc.read_hop(context.invocation_metadata())
        # asyncio.Lock: an uncontended acquire does not yield to the loop (one
        # loop cycle saved per streamed chunk compared with anyio.Lock).
        lock = asyncio.Lock()

        async def write(message: bytes) -> None:
            async with lock:
                await context.write(message)

        async def send(batch: list[bytes]) -> None:
            if batched:
                await write(rpc.pack_batch(batch))
            else:
                for chunk in batch:
                    await write(chunk)

        async def serve_one(payload: bytes) -> None:
            try:
                timeout = _time_left(context)
            except AnyServeError as exc:
                await send([to_stream_error(exc, _peek_id(payload))])
                return
            await stream_request(self.dispatcher, payload, metadata, timeout, send)

        async def serve_all() -> None:
            async with anyio.create_task_group() as tg:
                async for payload in requests:
                    tg.start_soon(serve_one, payload)

        try:
            await self.in_flight.run(call_id, serve_all())
        except CancelledByCaller:
            await context.abort(grpc.StatusCode.CANCELLED, CANCELLED_DETAILS)

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        ready = any(s.state is State.READY for s in self.manager.all_slots())
        return pb.ServerReadyResponse(ready=ready)

    def _named(self, name: str) -> list[HandlerInfo]:
        found = [h for h in self.handlers if rank(h.capability, {}, name) is not None]
        if not found:
            detail = f"no capability named {name!r} on this replica"
            raise NotFound(versions.unknown_model(name, "", detail))
        return found

    @grpc_method
    async def model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        handlers = self._named(request.name)
        if request.version:  # an unknown version is not ready (Triton: false, not an error)
            handlers = [h for h in handlers if h.version == request.version]
        ready = any(self.manager.pick(h.name) is not None for h in handlers)
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="anyserve", version=__version__, extensions=["capabilities", "streaming"]
        )

    def _described(
        self, name: str, context: grpc.aio.ServicerContext, version: str = ""
    ) -> tuple[HandlerInfo, str]:
        """The handler a metadata or config request is about (module docstring;
        ``version``: of that model version, else the latest) and the model name
        to answer with: the requested one, or the handler's (``model``, else
        ``type``) when capability metadata chose it. NotFound when none
        matches, InvalidArgument without a name or query."""
        pairs = context.invocation_metadata() or ()
        query = query_from_headers((k, v) for k, v in pairs if isinstance(v, str))
        try:
            handler = self.dispatcher.resolver.resolve(query, name, stream=False, version=version)
        except NotFound:
            handler = self.dispatcher.resolver.resolve(query, name, stream=True, version=version)
        return handler, handler.capability.name if query else name

    def _versions(self, name: str) -> list[str]:
        """Every version of model ``name`` served here, oldest first."""
        return versions.sorted_versions(
            h.version for h in self.handlers if rank(h.capability, {}, name) is not None
        )

    @grpc_method
    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        handler, name = self._described(request.name, context, request.version)
        return pb.ModelMetadataResponse(
            name=name,
            versions=self._versions(name) or [handler.version],
            platform=f"anyserve/{handler.name}",
            inputs=tensor_metadata(handler.inputs),
            outputs=tensor_metadata(handler.outputs),
        )

    @grpc_method
    async def model_config(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        handler, name = self._described(request.name, context, request.version)
        return pb.ModelConfigResponse(config=model_config(handler, name))

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        return repository_index(self.manager, ready_only=request.ready)


async def infer(
    dispatcher: Dispatcher, payload: bytes, metadata: Mapping[str, str], timeout: float | None
) -> bytes:
    """One ``ModelInfer`` call, whichever way it came (gRPC or the local lane):
    the dispatcher's answer, its access-log line. Raises what the dispatcher raises."""
    start, outcome = time.perf_counter(), "cancelled"
    try:
        answer = await dispatcher.unary(payload, metadata, timeout)
        outcome = "ok"
        return answer
    except AnyServeError as exc:
        outcome = exc.error_type
        raise
    finally:
        if access.isEnabledFor(logging.INFO):
            call_line("ModelInfer", metadata, outcome, time.perf_counter() - start)


async def stream_request(
    dispatcher: Dispatcher,
    payload: bytes,
    metadata: Mapping[str, str],
    timeout: float | None,
    send: Callable[[list[bytes]], Awaitable[None]],
) -> None:
    """One request of a ``ModelStreamInfer`` call, whichever way it came: each
    batch of responses ready together goes to ``send``. A failure is reported
    in-band as the last response (Triton's convention: the stream stays open
    for the call's other requests)."""
    start, outcome = time.perf_counter(), "cancelled"
    try:
        async for batch in dispatcher.stream(payload, metadata, timeout):
            await send(batch)
        outcome = "ok"
    except AnyServeError as exc:
        outcome = exc.error_type
        await send([to_stream_error(exc, _peek_id(payload))])
    finally:
        if access.isEnabledFor(logging.INFO):
            call_line("ModelStreamInfer", metadata, outcome, time.perf_counter() - start)


def _peek_id(payload: bytes) -> str:
    try:
        return rpc.peek_string_field(payload, 3)
    except ValueError:
        return ""


def _time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds before the caller's deadline (None: it set none); raises
    DeadlineExceeded when it has passed, so no handler starts unbounded."""
    left = context.time_remaining()
    if left is None:
        return None
    if left <= 0:
        raise DeadlineExceeded("the deadline passed before the call reached a worker")
    return float(left)
