"""The gRPC entry: the KServe v2 service of the API server, as a byte-level proxy.

``ModelInfer`` and ``ModelStreamInfer`` requests are routed like HTTP ones
(capability from ``x-capability-*`` metadata, else the ``model_name`` peeked
from the serialized request) and forwarded as the client's bytes; responses
come back the same way. On the bidirectional stream every request is routed on
its own (requests of one stream may reach different replicas) and responses
are relayed as they arrive, except that requests of one Triton sequence go to
its replica one after the other, in order (:mod:`anyserve.api_server.sequences`);
a failure of one request, routing errors included, is reported in-band
(Triton's convention: ``error_message`` set; the error's type in the
``anyserve_error`` parameter, see :func:`anyserve.errors.to_stream_error`) and
the stream goes on.
Server liveness, readiness, metadata and the repository index are answered
here, model control goes to the replicas' admin service
(:mod:`anyserve.api_server.model_control`), shared memory regions to
:mod:`anyserve.api_server.shm_control`; model readiness, metadata and
config are forwarded to a replica serving the name (or the capability of
``x-capability-*`` metadata). The client's
deadline travels to the replica.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import grpc
import grpc.aio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectSendStream

from anyserve import rpc, tracing_servers, wire
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.api_server import model_control, model_meta, shm_control
from anyserve.api_server.meta import RequestMeta, parse_meta
from anyserve.api_server.state import ApiState
from anyserve.errors import AnyServeError, InvalidArgument, NotFound, grpc_method, to_stream_error
from anyserve.lane_server import LaneServer, Send
from anyserve.logs import access
from anyserve.metrics.http import log_access
from anyserve.metrics.stats import model_statistics
from anyserve.proto import (
    ModelMetadataRequest,
    ModelReadyRequest,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerReadyResponse,
)

logger = logging.getLogger(__name__)

# grpc is untyped here (see pyproject): a grpc.aio.ServicerContext.
Context = Any
_OUT_BUFFER = 64  # responses of one client stream waiting for the client
# The status a request is counted under when it ended without an answer (the
# client cancelled it): nginx's "client closed request".
_CANCELLED = 499


class GrpcEntry:
    """The servicer; :meth:`handler` is what a grpc.aio server registers."""

    def __init__(self, state: ApiState) -> None:
        self._state = state

    def handler(self) -> grpc.GenericRpcHandler:
        """Generic handler with identity (de)serializers: bytes in, bytes out."""
        methods: dict[str, Any] = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                tracing_servers.grpc_method(self.model_infer, rpc.MODEL_INFER[1:], respond=True)
            ),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                tracing_servers.grpc_method(
                    self.model_stream_infer, rpc.MODEL_STREAM_INFER[1:], respond=True
                )
            ),
            "ServerLive": grpc.unary_unary_rpc_method_handler(self.server_live),
            "ServerReady": grpc.unary_unary_rpc_method_handler(self.server_ready),
            "ServerMetadata": grpc.unary_unary_rpc_method_handler(self.server_metadata),
            "ModelReady": grpc.unary_unary_rpc_method_handler(self.model_ready),
            "ModelMetadata": grpc.unary_unary_rpc_method_handler(self.model_metadata),
            "ModelConfig": grpc.unary_unary_rpc_method_handler(self.model_config),
            "RepositoryIndex": grpc.unary_unary_rpc_method_handler(self.repository_index),
            "RepositoryModelLoad": grpc.unary_unary_rpc_method_handler(self.model_load),
            "RepositoryModelUnload": grpc.unary_unary_rpc_method_handler(self.model_unload),
            "ModelStatistics": grpc.unary_unary_rpc_method_handler(self.model_statistics),
            # SystemSharedMemory* and CudaSharedMemory*: answered by shm_control.
            **shm_control.grpc_handlers(self._state),
        }
        return grpc.method_handlers_generic_handler(rpc.SERVICE, methods)

    # ----------------------------------------------------------------- helpers

    def _timeout(self, left: float | None) -> float:
        # Without a client deadline grpc reports None or a huge number.
        if left is None or not math.isfinite(left) or left > 10 * 365 * 86400:
            return self._state.config.request_timeout
        return max(float(left), 0.0)

    def _meta(self, context: Context, model_name: str) -> RequestMeta:
        pairs: Any = context.invocation_metadata() or ()
        return self.meta_of(pairs, context.time_remaining(), model_name)

    def meta_of(self, pairs: Any, left: float | None, model_name: str) -> RequestMeta:
        """A request's routing facts from its metadata pairs and seconds left."""
        return parse_meta(pairs, model_name=model_name, timeout=self._timeout(left))

    @staticmethod
    def _peek(request: bytes, field: int) -> str:
        try:
            return rpc.peek_string_field(request, field)
        except ValueError as exc:
            raise InvalidArgument(f"malformed request: {exc}") from None

    # ----------------------------------------------------------------- inference

    @grpc_method
    async def model_infer(self, request: bytes, context: Context) -> bytes:
        """Route one ModelInferRequest and return the replica's response bytes."""
        meta = self._meta(context, "")
        # gather: grpc.aio hands this server one call per loop iteration.
        return await self.infer(request, meta, gather=True)

    async def infer(self, request: bytes, meta: RequestMeta, *, gather: bool = False) -> bytes:
        """Route one ModelInferRequest (gRPC or the lane) with ``meta``, its
        routing facts but for the model name (``gather``: see
        ``Router.unary``); raises the anyserve error."""
        if not meta.query:
            # Only then does the name route. With a query the bytes are not
            # read here: the replica walks them anyway, and says if malformed.
            meta.model_name = self._peek(request, 1)
            if not meta.model_name:
                raise InvalidArgument("set x-capability-* metadata or the request's model_name")
        start, status, answer = time.perf_counter(), _CANCELLED, b""
        metrics = self._state.metrics
        metrics.in_flight += 1
        try:
            request = self._state.shared_memory.rewrite(request, meta)
            async with self._state.sequences.route(request, meta):
                answer = await self._state.router.unary(
                    rpc.MODEL_INFER, request, meta, gather=gather
                )
            status = 200
            return answer
        except AnyServeError as exc:
            status = exc.http_status
            raise
        finally:
            metrics.in_flight -= 1
            self._observe("ModelInfer", meta, status, start, len(request), len(answer))

    def _observe(
        self,
        method: str,
        meta: RequestMeta,
        status: int,
        start: float,
        sent: int,
        received: int,
        first: float | None = None,
    ) -> None:
        # One gRPC request measured (anyserve.metrics): status is the HTTP
        # status of its error (200 when it succeeded).
        seconds = time.perf_counter() - start
        self._state.metrics.observe(
            meta.capability,
            "grpc",
            status,
            seconds,
            request_bytes=sent,
            response_bytes=received,
            first_chunk=first,
            chunks=None if first is None else meta.chunks,
        )
        if access.isEnabledFor(logging.INFO):
            log_access("GRPC", method, status, seconds, meta)

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Relay every request of the client's stream; see the module docstring."""
        out_in, out = anyio.create_memory_object_stream[bytes](_OUT_BUFFER)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read_requests, requests, context, out_in, tg)
            async with out:
                async for message in out:
                    await context.write(message)

    async def _read_requests(
        self,
        requests: AsyncIterator[bytes],
        context: Context,
        out: MemoryObjectSendStream[bytes],
        tg: TaskGroup,
    ) -> None:
        async with out:
            async for request in requests:
                tg.start_soon(self._relay_one, request, context, out.clone())

    async def _relay_one(
        self, request: bytes, context: Context, out: MemoryObjectSendStream[bytes]
    ) -> None:
        async with out:
            await self.relay(request, lambda name: self._meta(context, name), out.send)

    async def relay(
        self,
        request: bytes,
        meta_of: Callable[[str], RequestMeta],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Relay one stream request's responses to ``send`` (gRPC or the
        lane); a failure is sent in-band, as Triton does."""
        request_id, model_name = "", ""
        try:
            request_id = self._peek(request, 3)
            model_name = self._peek(request, 1)
            meta = meta_of(model_name)
            if not meta.query and not meta.model_name:
                raise InvalidArgument("set x-capability-* metadata or the request's model_name")
        except AnyServeError as exc:
            await send(to_stream_error(exc, request_id, model_name))
            return
        start, status, size, first = time.perf_counter(), _CANCELLED, 0, None
        metrics = self._state.metrics
        metrics.in_flight += 1
        try:
            # Taking a sequence's turn is the first await here: requests of
            # one sequence are relayed, and answered, in arrival order.
            async with self._state.sequences.route(request, meta):
                try:
                    async with self._state.router.stream(request, meta) as stream:
                        while (message := await stream.read()) is not None:
                            if first is None:
                                first = time.perf_counter() - start
                            meta.chunks += 1
                            size += len(message)
                            await send(message)
                    status = 200
                except AnyServeError as exc:
                    # Answered before the sequence's next request is sent.
                    status = exc.http_status
                    await send(to_stream_error(exc, request_id, model_name))
        except AnyServeError as exc:
            status = exc.http_status
            await send(to_stream_error(exc, request_id, model_name))
        finally:
            metrics.in_flight -= 1
            self._observe("ModelStreamInfer", meta, status, start, len(request), size, first)

    # ----------------------------------------------------------------- metadata

    async def server_live(self, request: bytes, context: Context) -> bytes:
        """Always live while serving."""
        return ServerLiveResponse(live=True).SerializeToString()

    async def server_ready(self, request: bytes, context: Context) -> bytes:
        """Ready unless shutting down (see model_meta for why replicas don't count)."""
        return ServerReadyResponse(ready=not self._state.draining).SerializeToString()

    async def server_metadata(self, request: bytes, context: Context) -> bytes:
        """Name "anyserve", version and extensions."""
        return model_meta.server_metadata().SerializeToString()

    @grpc_method
    async def model_ready(self, request: bytes, context: Context) -> bytes:
        """Forwarded to a replica serving the name; served by none -> ready=false."""
        try:
            parsed = ModelReadyRequest.FromString(request)
        except Exception:
            raise InvalidArgument("malformed ModelReadyRequest") from None
        meta = self._meta(context, parsed.name)
        try:
            ready = await model_meta.model_ready(self._state, meta, parsed.version)
        except NotFound:
            ready = False
        return ModelReadyResponse(ready=ready).SerializeToString()

    @grpc_method
    async def model_metadata(self, request: bytes, context: Context) -> bytes:
        """Forwarded to a replica serving the name (NOT_FOUND when none does)."""
        try:
            parsed = ModelMetadataRequest.FromString(request)
        except Exception:
            raise InvalidArgument("malformed ModelMetadataRequest") from None
        meta = self._meta(context, parsed.name)
        if not meta.query and not meta.model_name:
            raise InvalidArgument("set the model name or x-capability-* metadata")
        return await model_meta.model_metadata(self._state, meta, parsed.version)

    @grpc_method
    async def model_config(self, request: bytes, context: Context) -> bytes:
        """Triton's model config, forwarded like ModelMetadata (NOT_FOUND when
        no replica serves the name)."""
        try:
            parsed = pb.ModelConfigRequest.FromString(request)
        except Exception:
            raise InvalidArgument("malformed ModelConfigRequest") from None
        meta = self._meta(context, parsed.name)
        if not meta.query and not meta.model_name:
            raise InvalidArgument("set the model name or x-capability-* metadata")
        return await model_meta.model_config(self._state, meta, parsed.version)

    @grpc_method
    async def model_load(self, request: bytes, context: Context) -> bytes:
        """Triton's model load: start the model's workers (model_control)."""
        name, keys = model_control.grpc_request(request)
        model_control.check_load_parameters(dict.fromkeys(keys, True), name)
        await model_control.load(self._state, name)
        return b""  # RepositoryModelLoadResponse has no fields

    @grpc_method
    async def model_unload(self, request: bytes, context: Context) -> bytes:
        """Triton's model unload: drain and stop the model's workers."""
        name, _ = model_control.grpc_request(request)
        await model_control.unload(self._state, name)
        return b""

    @grpc_method
    async def repository_index(self, request: bytes, context: Context) -> bytes:
        """Every capability in the registry with its state (model_meta says how)."""
        try:
            parsed = pb.RepositoryIndexRequest.FromString(request)
        except Exception:
            raise InvalidArgument("malformed RepositoryIndexRequest") from None
        index = model_meta.repository_index(self._state, ready_only=parsed.ready)
        return index.SerializeToString()

    @grpc_method
    async def model_statistics(self, request: bytes, context: Context) -> bytes:
        """Triton's inference statistics from this server's counters
        (:mod:`anyserve.metrics.stats`); NOT_FOUND for a model nobody serves."""
        try:
            parsed = pb.ModelStatisticsRequest.FromString(request)
        except Exception:
            raise InvalidArgument("malformed ModelStatisticsRequest") from None
        state = self._state
        stats = model_statistics(state.metrics, parsed.name, parsed.version, state.served_names())
        return stats.SerializeToString()


def entry_lane(state: ApiState, name: str) -> LaneServer:
    """The gRPC entry's ``ModelInfer`` and stream requests over a local lane
    (:mod:`anyserve.lane_server`): what a worker's ``context.call`` on this
    host sends instead of gRPC (``/health`` says where it is)."""
    entry = GrpcEntry(state)

    # The Call's map read into pairs once: its items() view is a Python generator.
    async def unary(payload: bytes, metadata: Mapping[str, str], timeout: float | None) -> bytes:
        pairs = [(key, metadata[key]) for key in metadata]
        return await entry.infer(payload, entry.meta_of(pairs, timeout, ""))

    async def stream(
        payload: bytes, metadata: Mapping[str, str], timeout: float | None, send: Send
    ) -> None:
        async def one(message: bytes) -> None:
            await send([message])

        pairs = [(key, metadata[key]) for key in metadata]
        await entry.relay(payload, lambda n: entry.meta_of(pairs, timeout, n), one)

    spans = (f"{rpc.SERVICE}/ModelInfer", f"{rpc.SERVICE}/ModelStreamInfer")
    return LaneServer(name, unary, stream, wire.DEFAULT_MAX_FRAME, spans)


async def start_grpc_server(state: ApiState, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """Bind and start the gRPC entry on ``host:port`` (0 = a free port).

    Returns ``(server, bound port)``; raises OSError when the port is taken.
    """
    server = grpc.aio.server(options=rpc.grpc_options())
    server.add_generic_rpc_handlers([GrpcEntry(state).handler()])
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}") from exc
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server, bound
