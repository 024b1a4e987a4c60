"""The replica's local lane: ``ModelInfer`` and stream requests from an API
server on this host over a Unix socket (:mod:`anyserve.lane_server`), served
by the same dispatcher calls as gRPC (``servicer.infer``,
``servicer.stream_request``)."""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any

from anyserve import rpc
from anyserve.lane_server import LaneServer, Send
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.servicer import infer, stream_request


def replica_lane(dispatcher: Dispatcher, replica_id: str, max_frame: int) -> LaneServer:
    """The lane server of replica ``replica_id`` (its Hello names the replica)."""

    def unary(
        payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> Coroutine[Any, Any, bytes]:
        # infer's coroutine itself, not one more awaiting it: one frame less per call.
        return infer(dispatcher, payload, rpc.forwarded(metadata), timeout)

    async def stream(
        payload: bytes, metadata: Mapping[str, str], timeout: float | None, send: Send
    ) -> None:
        await stream_request(dispatcher, payload, rpc.forwarded(metadata), timeout, send)

    spans = ("dispatch ModelInfer", "dispatch ModelStreamInfer")
    return LaneServer(replica_id, unary, stream, max_frame, spans)
