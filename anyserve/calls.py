"""Requests that leave a replica for the API server's gRPC entry.

Two things go back through the API server: ``context.call`` from inside a
handler (:class:`ApiCaller`, in worker processes) and delegation of requests a
replica cannot serve (:class:`ApiDelegator`, used by the replica's dispatcher).
Both send serialized bytes over one persistent :class:`ApiChannel`: gRPC, or
the API server's local lane (:mod:`anyserve.lane_server`) when it runs on
this host and said where in ``/health``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from anyserve import codec, rpc, tracing
from anyserve.capability import Capability, query_to_metadata
from anyserve.context import Context
from anyserve.errors import (
    DeadlineExceeded,
    LoopDetected,
    Unavailable,
    from_rpc_error,
    from_stream_response,
)
from anyserve.lane_client import Lane, Refused
from anyserve.lane_slot import LaneSlot, lane_on_this_host
from anyserve.objects.peers import OBJECT_SOURCE, PeerFetcher
from anyserve.objects.store import ObjectStore
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

if TYPE_CHECKING:
    import grpc.aio

log = logging.getLogger("anyserve.calls")

# Seconds to open the API server's local lane before a call goes over gRPC.
_LANE_OPEN_WITHIN = 2.0


# Longest chain of nested context.call()s before it is treated as runaway.
MAX_CALL_DEPTH = 16
CHAIN_SEP = ">"


class ApiChannel:
    """One persistent gRPC channel to the API server, created on first use.

    ``endpoint`` returns the API server's gRPC host:port, or None while it is
    not known yet (then calls fail with Unavailable). ``lane`` returns the
    API server's local lane (path, name) when it is on this host: calls go
    through it (a call it could not send goes over gRPC).
    """

    def __init__(
        self,
        endpoint: Callable[[], str | None],
        token: str | None = None,
        lane: Callable[[], tuple[str, str] | None] = lambda: None,
    ) -> None:
        self._endpoint = endpoint
        self._token = token
        self._channel: grpc.aio.Channel | None = None
        self._target: str | None = None
        self._lane_at = lane
        self._lanes = LaneSlot()

    async def _lane(self) -> Lane | None:
        where = self._lane_at()
        if where is None:
            return None
        return await self._lanes.get(*where, _LANE_OPEN_WITHIN, what="the API server")

    def known(self) -> bool:
        return self._endpoint() is not None

    async def _get(self) -> grpc.aio.Channel:
        import grpc.aio  # here: a worker loads gRPC at its first context.call

        target = self._endpoint()
        if target is None:
            raise Unavailable("the API server's gRPC endpoint is not known yet")
        if self._channel is None or target != self._target:
            # The API server moved (restarted on another port): the old channel
            # leads nowhere, so close it rather than leak it.
            old, self._channel = self._channel, None
            if old is not None:
                await old.close()
            self._channel = grpc.aio.insecure_channel(target, options=rpc.grpc_options())
            self._target = target
        return self._channel

    def _metadata(self, metadata: Mapping[str, str]) -> list[tuple[str, str]]:
        pairs = list(metadata.items())
        if self._token:
            pairs.append((rpc.AUTHORIZATION, f"Bearer {self._token}"))
        return pairs

    async def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> bytes:
        """ModelInfer through the API server (``timeout``: seconds, None: no
        deadline); raises the anyserve error it answered."""
        lane = await self._lane()
        if lane is not None:
            try:
                return await lane.unary(payload, self._metadata(metadata), timeout)
            except Refused:
                pass  # not sent: over gRPC
        import grpc.aio

        method = (await self._get()).unary_unary(rpc.MODEL_INFER)
        try:
            response: bytes = await method(
                payload, metadata=self._metadata(metadata), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return response

    async def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> AsyncGenerator[bytes, None]:
        """ModelStreamInfer with one request; yields serialized stream responses
        (in-band errors included, untouched). Leaving early cancels the call."""
        lane = await self._lane()
        if lane is not None:
            try:
                stream = lane.stream(payload, self._metadata(metadata), timeout)
            except Refused:
                pass  # not sent: over gRPC
            else:
                try:
                    while (message := await stream.read()) is not None:
                        yield message
                finally:
                    stream.stop()
                return
        import grpc.aio

        method = (await self._get()).stream_stream(rpc.MODEL_STREAM_INFER)
        call = method(iter([payload]), metadata=self._metadata(metadata), timeout=timeout)
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def aclose(self) -> None:
        self._lanes.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class ApiCaller:
    """``context.call`` for handlers: builds the request, carries the request id,
    deadline and call chain, and detects call cycles before sending.

    ``store``: the worker's object store, if it has one. Its ``peers`` become a
    ``PeerFetcher`` of the same API servers and token (objects missing from it are
    fetched from the replica that has them; closed with the caller), and every call
    names ``object_source`` (this replica's advertised endpoint) in
    ``x-anyserve-object-source`` so that a callee without a shared object directory
    knows whom to ask for the objects it references."""

    def __init__(
        self,
        api_server: str,
        token: str | None = None,
        object_source: str | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        # Comma-separated URLs (API servers sharing a registry) fail over in order.
        self.api_servers = [u.strip().rstrip("/") for u in api_server.split(",") if u.strip()]
        self.api_server = self.api_servers[0] if self.api_servers else api_server
        self._grpc_endpoint: str | None = None
        self._lane: tuple[str, str] | None = None
        self.channel = ApiChannel(lambda: self._grpc_endpoint, token, lambda: self._lane)
        self.object_source = object_source if store is not None else None
        self.peers: PeerFetcher | None = None
        if store is not None:
            self.peers = store.peers = PeerFetcher(
                api_server, token=token, own_endpoint=object_source
            )

    async def _discover(self) -> None:
        """Ask the first API server that answers (once) where its gRPC entry listens."""
        if self._grpc_endpoint is not None:
            return
        import httpx  # here, not at import: a worker that never calls does not load it

        problems: list[str] = []
        async with httpx.AsyncClient(timeout=5.0) as client:
            for url in self.api_servers:
                try:
                    answer = (await client.get(f"{url}/health")).json()
                except (httpx.HTTPError, ValueError) as exc:
                    problems.append(f"cannot reach the API server at {url}: {exc}")
                    continue
                endpoint = answer.get("grpc_endpoint") if isinstance(answer, dict) else None
                if endpoint:
                    self.api_server, self._grpc_endpoint = url, str(endpoint)
                    self._lane = lane_on_this_host(answer.get("lane"))
                    return
                problems.append(f"the API server at {url} did not say its gRPC endpoint")
        raise Unavailable("; ".join(problems) or "no API server URL given")

    def _forget(self) -> None:
        # The API server may be gone: the next call asks again (another one
        # of several answers then). This call is not retried: it may have run.
        if len(self.api_servers) > 1:
            self._grpc_endpoint, self._lane = None, None

    def _prepare(
        self, parent: Context, capability: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> tuple[bytes, dict[str, str], float | None]:
        target = Capability(capability)
        chain = [c for c in parent.metadata.get(rpc.CALL_CHAIN, "").split(CHAIN_SEP) if c]
        chain.append(str(parent.capability))
        for entry in chain:
            if Capability.parse(entry).matches(target):
                raise LoopDetected(
                    f"call cycle: {' > '.join([*chain, str(target)])} calls {target} again"
                )
        if len(chain) >= MAX_CALL_DEPTH:
            raise LoopDetected(f"call chain deeper than {MAX_CALL_DEPTH}: {' > '.join(chain)}")
        request = ModelInferRequest(id=parent.request_id)
        for name, value in inputs.items():
            if isinstance(value, ModelInferRequest.InferInputTensor):
                request.inputs.append(value)
            else:
                request.inputs.append(codec.encode_input(name, value))
        metadata = dict(query_to_metadata(target))
        metadata[rpc.REQUEST_ID] = parent.request_id
        metadata[rpc.CALL_CHAIN] = CHAIN_SEP.join(chain)
        if self.object_source:
            metadata[OBJECT_SOURCE] = self.object_source
        timeout = parent.time_remaining()
        if timeout is not None and timeout <= 0:
            # An expired deadline stays expired: the child must not run unbounded.
            raise DeadlineExceeded(
                f"no time left to call {target}: request {parent.request_id}'s deadline passed"
            )
        return request.SerializeToString(), metadata, timeout

    async def call(
        self, parent: Context, capability: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> ModelInferResponse:
        """Send one request; returns its response or raises the callee's error."""
        payload, metadata, timeout = self._prepare(parent, capability, inputs)
        await self._discover()
        with tracing.outgoing("call", metadata, parent.trace_context):
            try:
                answer = await self.channel.unary(payload, metadata, timeout)
            except Unavailable:
                self._forget()
                raise
        return ModelInferResponse.FromString(answer)

    async def stream(
        self, parent: Context, capability: Mapping[str, Any], inputs: Mapping[str, Any]
    ) -> AsyncIterator[ModelInferResponse]:
        """Send one streaming request; yields each chunk's ModelInferResponse and
        raises the error that ended the stream."""
        payload, metadata, timeout = self._prepare(parent, capability, inputs)
        await self._discover()
        with tracing.outgoing("call", metadata, parent.trace_context):
            try:
                async for message in self.channel.stream(payload, metadata, timeout):
                    chunk = ModelStreamInferResponse.FromString(message)
                    error = from_stream_response(chunk)
                    if error is not None:
                        raise error
                    yield chunk.infer_response
            except Unavailable:
                self._forget()
                raise

    async def aclose(self) -> None:
        await self.channel.aclose()
        if self.peers is not None:
            await self.peers.aclose()


class ApiDelegator:
    """Hands requests a replica cannot serve back to the API server.

    The request keeps its metadata (capability query, request id, call chain)
    and gains ``x-delegated-from`` and this replica in ``x-anyserve-visited`` so
    the API server never sends it back here.
    """

    def __init__(self, replica_id: str, channel: ApiChannel) -> None:
        self.replica_id = replica_id
        self.channel = channel

    def allowed(self, metadata: Mapping[str, str]) -> bool:
        return self.channel.known()

    def _hop(self, metadata: Mapping[str, str]) -> dict[str, str]:
        visited = [v for v in metadata.get(rpc.VISITED, "").split(",") if v]
        if self.replica_id not in visited:
            visited.append(self.replica_id)
        hop = dict(metadata)
        hop[rpc.DELEGATED_FROM] = self.replica_id
        hop[rpc.VISITED] = ",".join(visited)
        log.info(
            "delegating request %s (%s) back to the API server; visited %s",
            metadata.get(rpc.REQUEST_ID, "-"),
            ", ".join(f"{k}={v}" for k, v in metadata.items() if k.startswith("x-capability-"))
            or "by model name",
            hop[rpc.VISITED],
        )
        return hop

    async def unary(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> bytes:
        hop = self._hop(metadata)
        # The hop's span is a child of the replica's (current) dispatch span.
        with tracing.outgoing("delegate", hop):
            return await self.channel.unary(payload, hop, timeout)

    async def stream(
        self, payload: bytes, metadata: Mapping[str, str], timeout: float | None
    ) -> AsyncGenerator[bytes, None]:
        hop = self._hop(metadata)
        with tracing.outgoing("delegate", hop):
            async for message in self.channel.stream(payload, hop, timeout):
                yield message
