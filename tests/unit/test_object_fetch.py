"""Fetching an object from a peer replica: chunks, checks, limits, access, one write.

The sending side is a real ``Objects`` gRPC service on loopback over its own store;
the receiving side a store of its own directory with a ``PeerFetcher`` that finds the
sender through a real API server's ``/registry``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import grpc
import grpc.aio
import httpx
import pytest

from anyserve._proto import objects_pb2 as opb
from anyserve.errors import (
    AnyServeError,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    from_rpc_error,
)
from anyserve.objects import HEADER_LEN, ObjectStore, ObjRef
from anyserve.objects.peers import OBJECT_SOURCE, PeerFetcher, source_of
from anyserve.objects.service import FETCH, ObjectsServicer
from anyserve.objects.transfer import receive, send_chunks
from tests.fake_replica import running_api

pytestmark = pytest.mark.anyio

MIB = 1 << 20


def files(store: ObjectStore) -> list[str]:
    return sorted(os.listdir(store.root)) if store.root.exists() else []


async def chunks_of(store: ObjectStore, oid: str, size: int = MIB) -> list[opb.ObjectChunk]:
    return [c async for c in send_chunks(store, oid, size)]


async def replay(messages: Iterable[opb.ObjectChunk]) -> AsyncIterator[opb.ObjectChunk]:
    for message in messages:
        yield message


# --------------------------------------------------------------------------- the file


async def test_an_object_travels_in_chunks_and_arrives_whole(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b")
    data = os.urandom(2 * MIB + 123)
    ref = await a.create(data)
    os.utime(ref.path, (time.time() - 100, time.time() - 100))
    messages = await chunks_of(a, ref.id)
    whole = ref.path.read_bytes()
    assert messages[0].size == len(whole) == HEADER_LEN + len(data)
    assert 99 < messages[0].age_seconds < 110
    assert [len(m.data) for m in messages[1:-1]] == [MIB, MIB, len(whole) - 2 * MIB]
    assert messages[-1].sha256 == hashlib.sha256(whole).digest()
    mine = b.parse_ref(ref.id)
    assert await receive(b, mine, replay(messages), source="peer") == len(whole)
    assert await b.get(ref.id) == data
    assert files(b) == [f"{ref.id}.bin"]  # no temporary file left
    # It expires when the original does: the age came along.
    assert abs(os.stat(mine.path).st_mtime - os.stat(ref.path).st_mtime) < 5


async def test_a_checksum_mismatch_stores_nothing(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b")
    ref = await a.create(os.urandom(3 * MIB))
    messages = await chunks_of(a, ref.id)
    flipped = bytearray(messages[2].data)
    flipped[7] ^= 1
    messages[2] = opb.ObjectChunk(data=bytes(flipped))
    with pytest.raises(AnyServeError, match="failed its checksum"):
        await receive(b, b.parse_ref(ref.id), replay(messages), source="peer")
    assert files(b) == []
    with pytest.raises(NotFound):
        await b.get(ref.id)


async def test_short_long_and_headerless_transfers_store_nothing(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b")
    ref = await a.create(b"x" * 5000)
    good = await chunks_of(a, ref.id, 1000)
    mine = b.parse_ref(ref.id)
    short = [*good[:-2], good[-1]]
    with pytest.raises(AnyServeError, match="sent 5000 of 5032 bytes"):
        await receive(b, mine, replay(short), source="peer")
    extra = [*good[:-1], opb.ObjectChunk(data=b"y"), good[-1]]
    with pytest.raises(AnyServeError, match="more than the 5032 bytes"):
        await receive(b, mine, replay(extra), source="peer")
    with pytest.raises(AnyServeError, match="no checksum"):
        await receive(b, mine, replay(good[:-1]), source="peer")
    junk = b"not an anyserve object header...." * 2
    bad = [
        opb.ObjectChunk(size=len(junk)),
        opb.ObjectChunk(data=junk),
        opb.ObjectChunk(sha256=hashlib.sha256(junk).digest()),
    ]
    with pytest.raises(AnyServeError, match="corrupt"):
        await receive(b, mine, replay(bad), source="peer")
    with pytest.raises(AnyServeError, match="sent nothing"):
        await receive(b, mine, replay([]), source="peer")
    assert files(b) == []


async def test_an_object_over_the_size_limit_is_refused_before_writing(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b", max_object_size=1000)
    ref = await a.create(b"z" * 1001)
    messages = await chunks_of(a, ref.id)
    with pytest.raises(PayloadTooLarge, match="1001 bytes, over the limit of 1000"):
        await receive(b, b.parse_ref(ref.id), replay(messages), source="peer")
    assert files(b) == []
    fits = await a.create(b"z" * 1000)
    await receive(b, b.parse_ref(fits.id), replay(await chunks_of(a, fits.id)), source="peer")
    assert await b.get(fits.id) == b"z" * 1000


async def test_a_hostile_age_does_not_extend_the_ttl(tmp_path: Path) -> None:
    a, b = ObjectStore(tmp_path / "a"), ObjectStore(tmp_path / "b", ttl=60)
    ref = await a.create(b"old")
    messages = await chunks_of(a, ref.id)
    for age in (float("nan"), float("inf"), -1e300):
        messages[0] = opb.ObjectChunk(size=messages[0].size, age_seconds=age)
        mine = b.parse_ref(ref.id)
        await receive(b, mine, replay(messages), source="peer")
        assert os.stat(mine.path).st_mtime <= time.time() + 1


# --------------------------------------------------------------------------- the service


@dataclass
class Peer:
    store: ObjectStore
    endpoint: str
    fetches: list[str]


class CountingServicer(ObjectsServicer):
    def __init__(self, store: ObjectStore, token: str | None, seen: list[str]) -> None:
        super().__init__(store, token, chunk_size=64 * 1024)
        self.seen = seen

    async def fetch(
        self, request: opb.FetchObjectRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[opb.ObjectChunk]:
        self.seen.append(request.id)
        async for chunk in super().fetch(request, context):
            yield chunk


@asynccontextmanager
async def peer(root: Path, token: str | None = None) -> AsyncIterator[Peer]:
    store = ObjectStore(root)
    seen: list[str] = []
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((CountingServicer(store, token, seen).generic_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield Peer(store, f"127.0.0.1:{port}", seen)
    finally:
        await server.stop(None)


async def fetch_raw(endpoint: str, oid: str, token: str | None = None) -> bytes:
    async with grpc.aio.insecure_channel(endpoint) as channel:
        method = channel.unary_stream(
            FETCH,
            request_serializer=opb.FetchObjectRequest.SerializeToString,
            response_deserializer=opb.ObjectChunk.FromString,
        )
        metadata = [("authorization", f"Bearer {token}")] if token else []
        try:
            return b"".join(
                [m.data async for m in method(opb.FetchObjectRequest(id=oid), metadata=metadata)]
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


async def test_the_service_validates_ids_and_needs_the_token(tmp_path: Path) -> None:
    async with peer(tmp_path / "a", token="t0k") as a:
        ref = await a.store.create(b"secret")
        assert (await fetch_raw(a.endpoint, ref.id, "t0k"))[HEADER_LEN:] == b"secret"
        with pytest.raises(Unauthenticated):
            await fetch_raw(a.endpoint, ref.id)
        with pytest.raises(Unauthenticated):
            await fetch_raw(a.endpoint, ref.id, "wrong")
        with pytest.raises(NotFound, match="not found"):
            await fetch_raw(a.endpoint, "obj-" + "0" * 32, "t0k")
        (tmp_path / "outside.bin").write_bytes(b"nope")
        os.symlink(tmp_path / "outside.bin", a.store.root / f"obj-{'1' * 32}.bin")
        for bad in (
            "../outside",
            str(ref.path),  # the path form is for local handlers, not for peers
            ref.id.upper().replace("OBJ", "obj"),
            ref.id + "\x00",
            "",
            "obj-" + "1" * 32,  # a planted symlink is refused, not followed
        ):
            with pytest.raises(InvalidArgument):
                await fetch_raw(a.endpoint, bad, "t0k")


# --------------------------------------------------------------------------- the fetcher


@asynccontextmanager
async def registry_with(*peers: Peer) -> AsyncIterator[str]:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        for i, p in enumerate(peers):
            body = {"replica_id": f"r{i}", "endpoint": p.endpoint, "capabilities": [{"type": "x"}]}
            response = await http.post("/register", json=body)
            assert response.status_code == 200, response.text
        yield api.url


async def test_a_missing_object_is_fetched_from_the_peer_that_has_it(tmp_path: Path) -> None:
    async with peer(tmp_path / "a") as a, peer(tmp_path / "c") as c, registry_with(c, a) as url:
        data = os.urandom(300_000)
        ref = await a.store.create(data)
        fetcher = PeerFetcher(url)
        b = ObjectStore(tmp_path / "b", peers=fetcher)
        try:
            # No hint: every registered replica is asked until one has it.
            assert await b.get(ref.id) == data
            assert c.fetches == [ref.id] and a.fetches == [ref.id]
            assert (b.root / f"{ref.id}.bin").read_bytes() == ref.path.read_bytes()
            # Now it is local: no more transfers.
            assert await b.get(ref.id) == data
            assert a.fetches == [ref.id]
            # With the hint, its source is asked first (and only).
            other = await a.store.create(b"second")
            assert await b.get(other.id, source=a.endpoint) == b"second"
            assert c.fetches == [ref.id]
            # An object nobody has stays NotFound.
            with pytest.raises(NotFound, match="not found"):
                await b.get("obj-" + "2" * 32, source=a.endpoint)
            with pytest.raises(InvalidArgument):
                await b.get("obj-nothex")
        finally:
            await fetcher.aclose()


async def test_an_unregistered_source_is_never_contacted(tmp_path: Path) -> None:
    async with peer(tmp_path / "a") as a, registry_with() as url:
        ref = await a.store.create(b"x")
        fetcher = PeerFetcher(url, timeout=2)
        b = ObjectStore(tmp_path / "b", peers=fetcher)
        try:
            with pytest.raises(NotFound):
                await b.get(ref.id, source=a.endpoint)
            assert a.fetches == []
            assert files(b) == []
        finally:
            await fetcher.aclose()


async def test_two_fetches_of_one_object_transfer_and_write_it_once(tmp_path: Path) -> None:
    async with peer(tmp_path / "a") as a, registry_with(a) as url:
        data = os.urandom(2 * MIB)
        ref = await a.store.create(data)
        fetcher = PeerFetcher(url)
        b = ObjectStore(tmp_path / "b", peers=fetcher)
        results: list[object] = []

        async def get() -> None:
            results.append(await b.get(ref.id, source=a.endpoint))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(get)
            assert results == [data, data]
            assert a.fetches == [ref.id]
            assert files(b) == [f"{ref.id}.bin"]
        finally:
            await fetcher.aclose()


async def test_a_request_names_its_source_to_the_store(tmp_path: Path) -> None:
    plain = ObjectStore(tmp_path / "p")
    assert source_of(plain, {OBJECT_SOURCE: "10.0.0.1:5"}) is plain  # no peers: as today
    fetching = ObjectStore(tmp_path / "f", peers=PeerFetcher("http://127.0.0.1:9"))
    assert source_of(fetching, {}) is fetching
    facade = source_of(fetching, {OBJECT_SOURCE: "10.0.0.1:5"})
    assert facade.source == "10.0.0.1:5"
    ref = await facade.create(b"here")
    assert isinstance(ref, ObjRef)
    assert await facade.exists(ref) and await facade.get(ref) == b"here"
    assert await facade.delete(ref)
