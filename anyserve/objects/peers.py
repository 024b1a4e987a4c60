"""Objects across hosts: fetching an object this replica's store does not have.

Replicas on one machine, or on several sharing a mount, see every object in their
directory and never fetch. Replicas with a directory each fetch an object that is
missing from the replica that has it, over gRPC (``Objects.Fetch``, streamed in chunks
and checked: ``anyserve.objects.transfer``), into their own store; from then on it is a
local object that expires when the original does.

Where an object is, without changing the opaque reference: a replica that sends a
request through the API server (``context.call``) names itself in the request's
metadata (``x-anyserve-object-source: host:port``, its advertised endpoint); delegation
keeps that metadata. The receiving side asks that replica first, then the other
replicas in the API server's ``GET /registry``. A hint is only dialled when the registry
lists it: the header travels from clients too, and the fetch carries the replica token,
so an endpoint nobody registered is never contacted (no token leaks to a host a client
names). A miss with no peer having the object stays ``NotFound``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from anyserve import rpc
from anyserve.errors import DeadlineExceeded, NotFound, Unavailable, from_rpc_error
from anyserve.objects.ref import ObjRef, RefLike
from anyserve.objects.store import ObjectStore

if TYPE_CHECKING:
    import grpc.aio

__all__ = [
    "OBJECT_SOURCE",
    "OBJECT_SOURCE_ENV",
    "PeerFetch",
    "PeerFetcher",
    "SourcedObjects",
    "source_of",
]

log = logging.getLogger("anyserve.objects")

#: Request metadata naming the replica (``host:port``) a request's objects came from.
OBJECT_SOURCE = "x-anyserve-object-source"
#: How a replica tells its workers its own advertised endpoint.
OBJECT_SOURCE_ENV = "ANYSERVE_OBJECT_SOURCE"


class PeerFetch(Protocol):
    """Where a store gets an object it does not have (``PeerFetcher`` is one)."""

    async def fetch(self, store: ObjectStore, ref: ObjRef, hint: str | None) -> bool:
        """Bring ``ref`` into ``store``; False when no peer has it. ``hint``: the
        endpoint the request came from, if it said."""
        ...


@dataclass
class _Flight:
    """One object being fetched: later askers wait on the lock, then find it stored."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    users: int = 0


class PeerFetcher:
    """Fetches missing objects from the replicas the API server lists.

    ``api_server``: the API server URL(s), comma-separated (tried in order for
    ``/registry``). ``token``: the replica token (sent to ``/registry`` and on every
    fetch). ``own_endpoint``: this replica's advertised endpoint, never asked.
    ``timeout``: seconds for one whole transfer; ``registry_ttl``: seconds a registry
    answer is reused (misses within a burst ask the API server once).

    Concurrent fetches of one object in one process transfer and write it once.
    """

    def __init__(
        self,
        api_server: str,
        *,
        token: str | None = None,
        own_endpoint: str | None = None,
        timeout: float = 30.0,
        registry_ttl: float = 2.0,
    ) -> None:
        self.api_servers = [u.strip().rstrip("/") for u in api_server.split(",") if u.strip()]
        self.token = token
        self.own_endpoint = own_endpoint
        self.timeout = timeout
        self.registry_ttl = registry_ttl
        self._flights: dict[str, _Flight] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._endpoints: list[str] = []
        self._endpoints_at = -float("inf")

    def _metadata(self) -> list[tuple[str, str]]:
        return [(rpc.AUTHORIZATION, f"Bearer {self.token}")] if self.token else []

    async def fetch(self, store: ObjectStore, ref: ObjRef, hint: str | None) -> bool:
        """Bring ``ref`` into ``store`` from the peer that has it; True once it is there.

        False when no peer has it (or none answers: then it is logged). ``hint``: the
        endpoint the request says its objects came from, asked first when registered.
        Raises ``PayloadTooLarge`` (over the store's limit) and ``AnyServeError`` (checksum
        mismatch, short or corrupt transfer) from the peer that had it: nothing is stored.
        """
        flight = self._flights.get(ref.id)
        if flight is None:
            flight = self._flights[ref.id] = _Flight()
        flight.users += 1
        try:
            async with flight.lock:
                # Whoever held the lock may have stored it (or another worker process).
                if await store.exists(ref):
                    return True
                return await self._fetch(store, ref, hint)
        finally:
            flight.users -= 1
            if flight.users == 0:
                del self._flights[ref.id]

    async def _fetch(self, store: ObjectStore, ref: ObjRef, hint: str | None) -> bool:
        problems: list[str] = []
        for endpoint in await self._candidates(hint):
            started = time.monotonic()
            try:
                size = await self._fetch_from(endpoint, store, ref)
            except NotFound:
                continue
            except (Unavailable, DeadlineExceeded) as exc:
                problems.append(f"{endpoint}: {exc.message}")
                continue
            log.info(
                "fetched object %s (%d bytes) from %s in %.3f s",
                ref.id,
                size,
                endpoint,
                time.monotonic() - started,
            )
            return True
        if problems:
            log.warning("object %s: peers did not answer: %s", ref.id, "; ".join(problems))
        return False

    async def _fetch_from(self, endpoint: str, store: ObjectStore, ref: ObjRef) -> int:
        # Here, not at import: a worker loads gRPC only once it misses an object.
        import grpc.aio

        from anyserve._proto import objects_pb2 as opb
        from anyserve.objects.service import FETCH
        from anyserve.objects.transfer import receive

        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = grpc.aio.insecure_channel(
                endpoint, options=rpc.grpc_options()
            )
        method = channel.unary_stream(
            FETCH,
            request_serializer=opb.FetchObjectRequest.SerializeToString,
            response_deserializer=opb.ObjectChunk.FromString,
        )
        call = method(
            opb.FetchObjectRequest(id=ref.id), metadata=self._metadata(), timeout=self.timeout
        )
        try:
            return await receive(store, ref, call, source=endpoint)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def _candidates(self, hint: str | None) -> list[str]:
        """The registered endpoints to ask, the hint first when it is one of them."""
        endpoints = [e for e in await self._registered() if e != self.own_endpoint]
        if hint and hint in endpoints:
            endpoints.remove(hint)
            endpoints.insert(0, hint)
        elif hint and hint != self.own_endpoint:
            log.debug("object source %s is not a registered replica; not asking it", hint)
        return endpoints

    async def _registered(self) -> list[str]:
        if time.monotonic() - self._endpoints_at < self.registry_ttl:
            return self._endpoints
        import httpx  # here, not at import: only a missing object needs it

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with httpx.AsyncClient(timeout=5.0, headers=headers) as client:
            for url in self.api_servers:
                try:
                    answer = (await client.get(f"{url}/registry")).json()
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("cannot read the registry at %s: %s", url, exc)
                    continue
                self._endpoints = _endpoints(answer)
                self._endpoints_at = time.monotonic()
                return self._endpoints
        return []

    async def aclose(self) -> None:
        """Close the channels to peers."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def _endpoints(answer: object) -> list[str]:
    """The replicas' endpoints in a ``/registry`` answer, in its order, once each."""
    replicas = answer.get("replicas") if isinstance(answer, dict) else None
    seen: dict[str, None] = {}
    for entry in replicas if isinstance(replicas, list) else ():
        endpoint = entry.get("endpoint") if isinstance(entry, dict) else None
        if isinstance(endpoint, str) and endpoint:
            seen[endpoint] = None
    return list(seen)


class SourcedObjects:
    """A store as one request sees it: ``get`` names the request's object source.

    The other operations are the store's own. Errors are the store's.
    """

    def __init__(self, store: ObjectStore, source: str) -> None:
        self.store = store
        self.source = source

    async def create(self, data: Any) -> ObjRef:
        """``ObjectStore.create``."""
        return await self.store.create(data)

    async def get(self, ref: RefLike) -> Any:
        """``ObjectStore.get``, fetching a missing object from the source first."""
        return await self.store.get(ref, source=self.source)

    async def delete(self, ref: RefLike) -> bool:
        """``ObjectStore.delete``."""
        return await self.store.delete(ref)

    async def exists(self, ref: RefLike) -> bool:
        """``ObjectStore.exists``."""
        return await self.store.exists(ref)


def source_of(store: ObjectStore | None, metadata: Mapping[str, str]) -> Any:
    """The objects facade for one request: ``store``, or a ``SourcedObjects`` when the
    store fetches from peers and the request names where its objects came from."""
    source = metadata.get(OBJECT_SOURCE)
    if store is not None and store.peers is not None and source:
        return SourcedObjects(store, source)
    return store
