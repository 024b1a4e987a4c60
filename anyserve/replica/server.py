"""The replica: a grpc.aio KServe v2 server in front of worker processes.

``Replica.run`` describes the app (in a throwaway process), starts the workers,
serves ``inference.GRPCInferenceService`` (plus the admin service), registers
with the API server when one is given, and on cancellation shuts down in order:
unregister, stop taking calls and drain in-flight ones within the grace period,
stop the workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import grpc
import grpc.aio

from anyserve import __version__, rpc
from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.app import HandlerInfo
from anyserve.calls import ApiChannel, Delegator
from anyserve.errors import AnyServeError, NotFound, grpc_method, to_stream_error
from anyserve.objects import ObjectStore
from anyserve.replica.admin import AdminServicer
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.manager import Manager, WorkerConfig
from anyserve.replica.processes import describe_app
from anyserve.replica.registration import Registration
from anyserve.replica.slot import State

log = logging.getLogger("anyserve.replica")


@dataclass
class ReplicaConfig:
    """Everything ``anyserve start`` accepts."""

    app: str
    port: int = 50051
    host: str = "127.0.0.1"
    replica_id: str | None = None
    api_server: str | None = None
    advertise: str | None = None
    object_store: str | None = None
    object_ttl: float = 3600.0
    object_max_size: int | None = None
    token: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    app_dir: str | None = None
    grace: float = 10.0
    max_message: int = rpc.DEFAULT_MAX_MESSAGE
    log_level: str = "info"


class Replica:
    """One replica process's serving machinery (usable in-process in tests)."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        self.port = config.port
        self.replica_id = config.replica_id or ""
        self.handlers: list[HandlerInfo] = []
        self.manager: Manager | None = None
        self.dispatcher: Dispatcher | None = None
        self.server: grpc.aio.Server | None = None
        self.registration: Registration | None = None
        self.api_channel: ApiChannel | None = None
        self.store: ObjectStore | None = None

    @property
    def endpoint(self) -> str:
        """host:port other processes dial."""
        return self.config.advertise or f"{self.config.host}:{self.port}"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Replica] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports started (with itself) once workers are
        ready and the port is bound. Raises RuntimeError when the app cannot be
        loaded or the port cannot be bound."""
        cfg = self.config
        app_name, self.handlers = await describe_app(cfg.app, cfg.app_dir)
        server = grpc.aio.server(options=rpc.grpc_options(cfg.max_message))
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind {cfg.host}:{cfg.port}")
        self.replica_id = cfg.replica_id or f"{socket.gethostname()}-{self.port}"
        if cfg.object_store:
            os.makedirs(cfg.object_store, mode=0o700, exist_ok=True)
            self.store = ObjectStore(
                cfg.object_store, ttl=cfg.object_ttl, max_object_size=cfg.object_max_size
            )
        worker_env = {"ANYSERVE_TOKEN": cfg.token} if cfg.token else {}
        self.manager = Manager(
            self.handlers,
            WorkerConfig(
                app=cfg.app,
                app_dir=cfg.app_dir or os.getcwd(),
                replica_id=self.replica_id,
                object_store=cfg.object_store,
                object_ttl=cfg.object_ttl,
                object_max_size=cfg.object_max_size,
                api_server=cfg.api_server,
                max_frame=cfg.max_message,
                log_level=cfg.log_level,
                env=worker_env,
            ),
            resources=cfg.resources,
            on_change=self._changed,
        )
        delegator = None
        if cfg.api_server:
            self.registration = Registration(
                cfg.api_server, self.registration_body, token=cfg.token
            )
            registration = self.registration
            self.api_channel = ApiChannel(lambda: registration.grpc_endpoint, cfg.token)
            delegator = Delegator(self.replica_id, self.api_channel)
        self.dispatcher = Dispatcher(self.handlers, self.manager, delegator)
        servicer = _Servicer(self)
        admin = AdminServicer(self.manager, self.replica_id, cfg.token)
        server.add_generic_rpc_handlers((servicer.generic_handler(), admin.generic_handler()))
        self.server = server
        manager = self.manager
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            try:
                async with anyio.create_task_group() as services:
                    await server.start()
                    if self.store is not None:
                        services.start_soon(self.store.run_sweeper)
                    if self.registration is not None:
                        services.start_soon(self.registration.run)
                    log.info(
                        "replica %s (app %s) serving %s on %s",
                        self.replica_id,
                        app_name,
                        ", ".join(f"{h.name}[{h.capability}]" for h in self.handlers),
                        self.endpoint,
                    )
                    task_status.started(self)
                    await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
                    manager.stop()

    async def _shutdown(self) -> None:
        """Leave the registry, drain in-flight calls, then let the workers go."""
        log.info(
            "replica %s stopping: draining calls (grace %.0fs)", self.replica_id, self.config.grace
        )
        if self.registration is not None:
            await self.registration.unregister()
            await self.registration.aclose()
        if self.server is not None:
            await self.server.stop(self.config.grace)
        if self.api_channel is not None:
            await self.api_channel.aclose()
        log.info("replica %s drained; stopping workers", self.replica_id)

    def _changed(self) -> None:
        if self.registration is not None:
            self.registration.notify()

    def registration_body(self) -> dict[str, Any]:
        """The /register body: loaded and loadable capabilities, and the workers."""
        assert self.manager is not None
        loaded: list[dict[str, str]] = []
        loadable: list[dict[str, str]] = []
        for handler in self.handlers:
            cap = handler.capability.to_dict()
            availability = self.manager.availability(handler.name)
            if availability == "loaded" and cap not in loaded:
                loaded.append(cap)
            elif availability == "loadable" and cap not in loadable:
                loadable.append(cap)
        return {
            "replica_id": self.replica_id,
            "endpoint": self.endpoint,
            "capabilities": loaded,
            "loadable": [c for c in loadable if c not in loaded],
            # Stopped slots are history, not workers.
            "workers": [
                s.describe()
                for slots in self.manager.slots.values()
                for s in slots
                if s.state is not State.STOPPED
            ],
        }


class _Servicer:
    """gRPC method handlers; payloads stay bytes on the inference path."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def typed(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )

        handlers = {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(self.model_stream_infer),
            "ServerLive": typed(self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": typed(self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": typed(self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": typed(
                self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": typed(
                self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
        }
        return grpc.method_handlers_generic_handler(rpc.SERVICE, handlers)

    @property
    def dispatcher(self) -> Dispatcher:
        assert self.replica.dispatcher is not None
        return self.replica.dispatcher

    @grpc_method
    async def model_infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        metadata = rpc.forwardable(context.invocation_metadata())
        return await self.dispatcher.unary(request, metadata, context.time_remaining() or 0.0)

    async def model_stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        metadata = rpc.forwardable(context.invocation_metadata())
        batched = any(
            key == rpc.BATCH and value == "1" for key, value in context.invocation_metadata() or ()
        )
        # asyncio.Lock: an uncontended acquire does not yield to the loop (one
        # loop cycle saved per streamed chunk compared with anyio.Lock).
        lock = asyncio.Lock()

        async def write(message: bytes) -> None:
            async with lock:
                await context.write(message)

        async def serve_one(payload: bytes) -> None:
            try:
                async for batch in self.dispatcher.stream(
                    payload, metadata, context.time_remaining() or 0.0
                ):
                    if batched:
                        await write(rpc.pack_batch(batch))
                    else:
                        for chunk in batch:
                            await write(chunk)
            except AnyServeError as exc:
                # Triton's convention: a failed request on a stream is reported
                # in-band and the stream stays open for the others.
                error = to_stream_error(exc, _peek_id(payload))
                await write(rpc.pack_batch([error]) if batched else error)

        async with anyio.create_task_group() as tg:
            async for payload in requests:
                tg.start_soon(serve_one, payload)

    async def server_live(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        manager = self.replica.manager
        ready = manager is not None and any(
            s.state is State.READY for slots in manager.slots.values() for s in slots
        )
        return pb.ServerReadyResponse(ready=ready)

    def _named(self, name: str) -> list[HandlerInfo]:
        found = [h for h in self.replica.handlers if h.capability.serves_name(name)]
        if not found:
            raise NotFound(f"no capability named {name!r} on this replica")
        return found

    @grpc_method
    async def model_ready(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        handlers = self._named(request.name)
        manager = self.replica.manager
        assert manager is not None
        ready = any(manager.pick(h.name) is not None for h in handlers)
        return pb.ModelReadyResponse(ready=ready)

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="anyserve", version=__version__, extensions=["capabilities", "streaming"]
        )

    @grpc_method
    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        handlers = self._named(request.name)
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform=f"anyserve/{handlers[0].name}"
        )


def _peek_id(payload: bytes) -> str:
    try:
        return rpc.peek_string_field(payload, 3)
    except ValueError:
        return ""
