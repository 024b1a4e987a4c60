"""The replica's ``anyserve.objects.Objects`` gRPC service: peers fetch objects here.

Served on the replica port next to the KServe service (``protos/objects.proto``).
``Fetch`` streams one object of the replica's store (``anyserve.objects.transfer``).
With a token configured, every call needs ``authorization: Bearer <token>`` metadata
(compared in constant time), the same token replicas register with; without one,
fetches are served like inference is: to whoever reaches the port.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator

import grpc
import grpc.aio

from anyserve import rpc
from anyserve._proto import objects_pb2 as opb
from anyserve.errors import AnyServeError, Unauthenticated, abort
from anyserve.objects.store import ObjectStore
from anyserve.objects.transfer import CHUNK_SIZE, send_chunks

__all__ = ["FETCH", "SERVICE", "ObjectsServicer"]

SERVICE = "anyserve.objects.Objects"
FETCH = f"/{SERVICE}/Fetch"


class ObjectsServicer:
    """``Objects.Fetch`` over one replica's store."""

    def __init__(self, store: ObjectStore, token: str | None, chunk_size: int = CHUNK_SIZE) -> None:
        self.store = store
        self.token = token
        self.chunk_size = chunk_size

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to add to the replica's ``grpc.aio`` server."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Fetch": grpc.unary_stream_rpc_method_handler(
                    self.fetch,
                    request_deserializer=opb.FetchObjectRequest.FromString,
                    response_serializer=opb.ObjectChunk.SerializeToString,
                )
            },
        )

    def _authorize(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        if not self.token:
            return
        given = dict(context.invocation_metadata() or ()).get(rpc.AUTHORIZATION, "")
        if not hmac.compare_digest(str(given).encode(), f"Bearer {self.token}".encode()):
            raise Unauthenticated("object fetches need 'authorization: Bearer <token>'")

    async def fetch(
        self,
        request: opb.FetchObjectRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[opb.ObjectChunk]:
        """Stream the object ``request.id``; ends the call with the anyserve error
        (UNAUTHENTICATED, INVALID_ARGUMENT, NOT_FOUND...) when it cannot."""
        try:
            self._authorize(context)
            async for chunk in send_chunks(self.store, request.id, self.chunk_size):
                yield chunk
        except AnyServeError as exc:
            await abort(context, exc)
