"""The replica's admin gRPC service: list, start and stop workers at runtime.

Served on the replica port (``anyserve.admin.Admin``). With a token configured,
every call needs ``authorization: Bearer <token>`` metadata, compared in
constant time.

``StartWorker`` answers once the started workers are ready (or failed: then
with UNAVAILABLE naming the failure); ``StopWorker`` once they have exited. Both
are bounded by the call's deadline; a stop that outlives it still completes.
"""

from __future__ import annotations

import hmac
from typing import Any

import anyio
import grpc
import grpc.aio

from anyserve import rpc
from anyserve._proto import admin_pb2 as apb
from anyserve.capability import Capability, rank
from anyserve.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unauthenticated,
    Unavailable,
    grpc_method,
)
from anyserve.replica.manager import Manager
from anyserve.replica.slot import Slot, State
from anyserve.replica.status import workers_reply

SERVICE = "anyserve.admin.Admin"
LIST_WORKERS = f"/{SERVICE}/ListWorkers"
START_WORKER = f"/{SERVICE}/StartWorker"
STOP_WORKER = f"/{SERVICE}/StopWorker"


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
        return workers_reply(self.manager, self.replica_id)

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if not self.token:
            return
        given = dict(context.invocation_metadata() or ()).get(rpc.AUTHORIZATION, "")
        if not hmac.compare_digest(str(given).encode(), f"Bearer {self.token}".encode()):
            raise Unauthenticated("admin calls need 'authorization: Bearer <token>'")

    def handler_for(self, text: str) -> str:
        """A handler name from a handler name, a capability (``type=heavy``) or
        a KServe model name (``model``, else ``type``: Triton's model control).

        Raises NotFound when nothing matches, InvalidArgument when a capability
        matches several handlers equally well.
        """
        if text in self.manager.handlers:
            return text
        if "=" not in text:
            named = [h.name for h in self.manager.handlers.values() if h.capability.name == text]
            if len(named) == 1:
                return named[0]
        query = Capability.parse(text)
        ranked = [
            (found, h)
            for h in self.manager.handlers.values()
            if (found := rank(h.capability, query)) is not None
        ]
        if not ranked:
            raise NotFound(f"no handler for {text!r}; handlers: {sorted(self.manager.handlers)}")
        best = min(found for found, _ in ranked)
        closest = [h for found, h in ranked if found == best]
        if len(closest) > 1:
            names = sorted(h.name for h in closest)
            raise InvalidArgument(f"{text!r} matches several handlers {names}; name one")
        return closest[0].name

    @grpc_method
    async def list_workers(
        self, request: apb.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        self._authorize(context)
        return self._reply()

    @grpc_method
    async def start_worker(
        self, request: apb.StartWorkerRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        self._authorize(context)
        name = self.handler_for(request.capability)
        handler = self.manager.handlers[name]
        count = request.count or max(handler.workers, 1)
        running = [s for s in self.manager.slots[name] if s.wanted]
        more = max(count - len(running), 0)
        budget = self.manager.budget
        if not budget.fits(handler, count=more):
            raise Overloaded(
                f"{name} needs {dict(handler.resources)} per worker; "
                f"the replica has {budget.free()} free "
                "(stop a worker that holds them first)"
            )
        started = self.manager.start_handler(name, count=more) if more else []
        slots = [*running, *started]
        await self._settle(slots, context)
        if slots and all(s.state is State.FAILED for s in slots):
            raise Unavailable(f"handler {name} failed: {slots[0].failure}")
        return self._reply()

    async def _settle(self, slots: list[Slot], context: grpc.aio.ServicerContext) -> None:
        """Wait while any of ``slots`` is starting (crash-loop restarts included),
        within the call's deadline, else the handlers' start timeout."""
        left = context.time_remaining()
        config = self.manager.config
        longest = max(
            (config.start_timeout_for(s.handler) for s in slots), default=config.start_timeout
        )
        timeout = longest if left is None else max(left - 0.2, 0.0)
        with anyio.move_on_after(timeout):
            for slot in slots:
                # ready is set once the slot is READY, FAILED or STOPPED; a crash
                # while starting clears it again for the restart.
                while slot.wanted and slot.state is not State.READY:
                    if slot.ready.is_set():
                        # Only while the replica shuts down (every slot is woken);
                        # Event.wait() would return without yielding.
                        await anyio.sleep(0.01)
                    else:
                        await slot.ready.wait()
            return
        raise DeadlineExceeded("workers are still starting; see `anyserve workers list`")

    @grpc_method
    async def stop_worker(
        self, request: apb.StopWorkerRequest, context: grpc.aio.ServicerContext
    ) -> apb.WorkersReply:
        self._authorize(context)
        text = request.worker_id
        models = {h.capability.name for h in self.manager.handlers.values()}
        if text in self.manager.handlers or "=" in text or text in models:
            name = self.handler_for(text)
            slots = [s for s in self.manager.slots[name] if s.wanted]
            if not slots:
                # Nothing running: still keep it from starting on demand.
                self.manager.disable(name)
        else:
            slots = [self.manager.slot(text)]
        # Every worker leaves the registration at once, then they drain together.
        for slot in slots:
            self.manager.begin_stop(slot, drain=request.drain)
        for slot in slots:
            await slot.stopped.wait()
        return self._reply()
