"""The replica's admin gRPC service: list, start and stop workers at runtime.

Served on the replica port (``anyserve.admin.Admin``). With a token configured,
every call needs ``authorization: Bearer <token>`` metadata, compared in
constant time.
"""

from __future__ import annotations

import hmac
from typing import Any

import grpc
import grpc.aio

from anyserve import rpc
from anyserve._proto import admin_pb2 as apb
from anyserve.capability import Capability
from anyserve.errors import AnyServeError, InvalidArgument, NotFound, Overloaded, Unauthenticated
from anyserve.replica.manager import Manager, Slot

SERVICE = "anyserve.admin.Admin"
LIST_WORKERS = f"/{SERVICE}/ListWorkers"
START_WORKER = f"/{SERVICE}/StartWorker"
STOP_WORKER = f"/{SERVICE}/StopWorker"


def worker_info(slot: Slot) -> apb.WorkerInfo:
    """The admin message for one worker slot."""
    return apb.WorkerInfo(
        id=slot.id,
        handler=slot.handler.name,
        capability=slot.handler.capability.to_dict(),
        pid=slot.pid or 0,
        state=slot.state.value,
        inflight=slot.inflight,
        restarts=slot.restarts,
        error=slot.failure,
    )


class AdminServicer:
    """Admin RPCs over a replica's manager."""

    def __init__(self, manager: Manager, replica_id: str, token: str | None) -> None:
        self.manager = manager
        self.replica_id = replica_id
        self.token = token

    def generic_handler(self) -> grpc.GenericRpcHandler:
        def typed(fn: Any, req: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                fn,
                request_deserializer=req.FromString,
                response_serializer=apb.WorkersReply.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "ListWorkers": typed(self.list_workers, apb.ListWorkersRequest),
                "StartWorker": typed(self.start_worker, apb.StartWorkerRequest),
                "StopWorker": typed(self.stop_worker, apb.StopWorkerRequest),
            },
        )

    def _reply(self) -> apb.WorkersReply:
        slots = [s for group in self.manager.slots.values() for s in group]
        return apb.WorkersReply(replica_id=self.replica_id, workers=[worker_info(s) for s in slots])

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.token:
            return
        given = dict(context.invocation_metadata() or ()).get(rpc.AUTHORIZATION, "")
        if not hmac.compare_digest(str(given).encode(), f"Bearer {self.token}".encode()):
            raise Unauthenticated("admin calls need 'authorization: Bearer <token>'")

    def handler_for(self, text: str) -> str:
        """A handler name from a handler name or a capability (``type=heavy``).

        Raises NotFound when nothing matches, InvalidArgument when a capability
        matches several handlers equally well.
        """
        if text in self.manager.handlers:
            return text
        query = Capability.parse(text)
        matches = [h for h in self.manager.handlers.values() if h.capability.matches(query)]
        if not matches:
            raise NotFound(f"no handler for {text!r}; handlers: {sorted(self.manager.handlers)}")
        best = min(h.capability.extra_keys(query) for h in matches)
        closest = [h for h in matches if h.capability.extra_keys(query) == best]
        if len(closest) > 1:
            names = sorted(h.name for h in closest)
            raise InvalidArgument(f"{text!r} matches several handlers {names}; name one")
        return closest[0].name

    async def list_workers(
        self, request: apb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        try:
            self._authorize(context)
        except AnyServeError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return self._reply()

    async def start_worker(
        self, request: apb.StartWorkerRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        try:
            self._authorize(context)
            name = self.handler_for(request.capability)
            handler = self.manager.handlers[name]
            count = request.count or max(handler.workers, 1)
            running = sum(1 for s in self.manager.slots[name] if s.wanted)
            if not self.manager.fits(handler, count=max(count - running, 0)):
                raise Overloaded(
                    f"{name} needs {dict(handler.resources)} per worker; "
                    f"the replica has {self.manager.free()} free"
                )
            if count > running:
                self.manager.start_handler(name, count=count - running)
        except AnyServeError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return self._reply()

    async def stop_worker(
        self, request: apb.StopWorkerRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        try:
            self._authorize(context)
            if request.worker_id in self.manager.handlers or "=" in request.worker_id:
                name = self.handler_for(request.worker_id)
                ids = [s.id for s in self.manager.slots[name] if s.wanted]
            else:
                ids = [self.manager.slot(request.worker_id).id]
            for worker_id in ids:
                await self.manager.stop_worker(worker_id, drain=request.drain)
        except AnyServeError as exc:
            await context.abort(exc.grpc_code, exc.message)
        return self._reply()
