"""The Redis registry backend against a real redis-server (one per test, on a
free port, in a temporary directory): records, Redis TTLs, pub/sub, resync
and outages. :class:`RedisServer` is also what tests/test_registry_redis.py uses.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.registry import Registry, ReplicaEntry
from anyserve.api_server.registry_backend import MemoryBackend, make_backend
from anyserve.capability import Capability
from anyserve.errors import StartupError
from tests.support import eventually, free_port

if TYPE_CHECKING:
    from anyserve.api_server.registry_redis import RedisBackend

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server not found: install the Debian package redis-server (`make install`"
    " does when run as root)",
)


class RedisServer:
    """A private redis-server process: no persistence, killed by :meth:`kill`.
    :meth:`start` again brings a fresh, empty one up on the same port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: anyio.abc.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = await anyio.open_process(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        await eventually(self.answers, timeout=10, what=f"redis-server on port {self.port}")

    async def answers(self) -> bool:
        assert self.proc is not None and self.proc.returncode is None, "redis-server exited"
        try:
            async with await anyio.connect_tcp("127.0.0.1", self.port) as stream:
                await stream.send(b"PING\r\n")
                return (await stream.receive()).startswith(b"+PONG")
        except OSError:
            return False

    async def kill(self) -> None:
        if self.proc is not None:
            with anyio.CancelScope(shield=True):
                if self.proc.returncode is None:
                    self.proc.kill()
                await self.proc.wait()
            self.proc = None


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[RedisServer]:
    """A started :class:`RedisServer`, killed on the way out."""
    server = RedisServer(directory)
    try:
        await server.start()
        yield server
    finally:
        await server.kill()


def entry(replica_id: str = "r1", **caps: str) -> ReplicaEntry:
    return ReplicaEntry(
        replica_id,
        "127.0.0.1:50051",
        (Capability(caps or {"type": "chat"}),),
        loadable=(Capability({"type": "embed"}),),
        failed=(Capability({"type": "broken"}),),
        workers=[{"pid": 1, "state": "ready"}],
        registered_at=1234.5,
    )


def test_records_round_trip_and_bad_ones_are_refused() -> None:
    from anyserve.api_server.registry_redis import apply_record, redacted, to_record

    original = entry(model="m", type="chat")
    record = json.loads(json.dumps(to_record(original)))
    view = Registry(ttl=5)
    copy = apply_record(view, record, age=1.0)
    assert to_record(copy) == to_record(original)
    assert view.get("r1") is copy
    assert 0.9 < view.now() - copy.last_seen < 1.5
    bads: list[Any] = [[], {"replica_id": 1, "endpoint": "x"}, {**record, "capabilities": [1]}]
    for bad in bads:
        with pytest.raises(ValueError):
            apply_record(view, bad)
    assert redacted("redis://user:secret@host:6379/0") == "redis://user:***@host:6379/0"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


def test_memory_is_the_default_and_registry_urls_are_checked() -> None:
    config = ApiServerConfig(port=0, grpc_port=0)
    assert config.registry == "memory"
    assert isinstance(make_backend(config, Registry(1)), MemoryBackend)
    with pytest.raises(ValueError, match="registry must be 'memory' or a Redis URL"):
        ApiServerConfig(registry="mysql://x")


def test_a_missing_redis_package_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "redis" or m.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "anyserve.api_server.registry_redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    config = ApiServerConfig(port=0, grpc_port=0, registry="redis://127.0.0.1:1/0")
    with pytest.raises(StartupError, match=r"pip install 'anyserve\[redis\]'"):
        make_backend(config, Registry(1))


@asynccontextmanager
async def following(url: str, view: Registry, interval: float = 0.1) -> AsyncIterator[RedisBackend]:
    """A started RedisBackend for ``view``, stopped on the way out."""
    from anyserve.api_server.registry_redis import RedisBackend

    backend = RedisBackend(url, view, heartbeat_interval=interval)
    async with anyio.create_task_group() as tg:
        await tg.start(backend.run)
        await eventually(lambda: backend.connected, timeout=5, what="connected to Redis")
        yield backend
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@needs_redis
async def test_writes_go_through_with_the_ttl_and_reach_other_views(tmp_path: Path) -> None:
    import redis.asyncio as redis

    from anyserve.api_server.registry_redis import REPLICA_PREFIX, to_record

    mine, theirs = Registry(ttl=0.5), Registry(ttl=0.5)
    async with (
        redis_server(tmp_path) as server,
        following(server.url, mine) as a,
        following(server.url, theirs),
        redis.Redis.from_url(server.url) as client,
    ):
        assert a.status() == {
            "backend": "redis", "connected": True, "error": None
        }  # fmt: skip
        replica, _ = mine.upsert("r1", "127.0.0.1:1", [Capability(type="chat")])
        a.stored(replica)
        await eventually(lambda: theirs.get("r1") is not None, timeout=2, what="r1 reached B")
        raw = await client.get(REPLICA_PREFIX + "r1")
        assert raw is not None and json.loads(raw) == to_record(replica)
        assert 0 < await client.pttl(REPLICA_PREFIX + "r1") <= 500

        # No more heartbeats: Redis drops the key by its TTL, the views by theirs.
        async def expired() -> bool:
            return not await client.exists(REPLICA_PREFIX + "r1")

        await eventually(expired, timeout=2, what="the key expired in Redis")
        await eventually(lambda: theirs.get("r1") is None, timeout=2, what="r1 expired in B")

        replica, _ = mine.upsert("r2", "127.0.0.1:2", [Capability(type="embed")])
        a.stored(replica)
        await eventually(lambda: theirs.get("r2") is not None, timeout=2, what="r2 reached B")
        mine.remove("r2")
        a.removed("r2")
        await eventually(lambda: theirs.get("r2") is None, timeout=2, what="r2 left B")
        assert not await client.exists(REPLICA_PREFIX + "r2")


@pytest.mark.anyio
@needs_redis
async def test_resync_keeps_in_flight_and_follows_what_redis_holds(tmp_path: Path) -> None:
    import redis.asyncio as redis

    from anyserve.api_server.registry_redis import REPLICA_PREFIX, to_record

    view = Registry(ttl=5)
    async with (
        redis_server(tmp_path) as server,
        redis.Redis.from_url(server.url) as client,
    ):
        # Written behind the backend's back (no pub/sub): only a resync finds them.
        record = to_record(entry("r1", type="chat"))
        await client.set(REPLICA_PREFIX + "r1", json.dumps(record), px=5000)
        async with following(server.url, view, interval=0.1) as backend:
            found = view.get("r1")
            assert found is not None  # the first resync ran before "connected"
            found.in_flight = 3
            record["capabilities"] = [{"type": "chat", "model": "new"}]
            await client.set(REPLICA_PREFIX + "r1", json.dumps(record), px=5000)
            await eventually(
                lambda: found.capabilities[0].get("model") == "new",
                timeout=2,
                what="the resync picked up the new capabilities",
            )
            assert view.get("r1") is found and found.in_flight == 3

            # Deleted behind its back, Redis not emptied: the resync drops it.
            await client.delete(REPLICA_PREFIX + "r1")
            await eventually(lambda: view.get("r1") is None, timeout=2, what="r1 dropped")

            # Redis emptied: the view keeps what it had (heartbeats rewrite it).
            await client.set(REPLICA_PREFIX + "r2", json.dumps(to_record(entry("r2"))), px=5000)
            await eventually(lambda: view.get("r2") is not None, timeout=2, what="r2 found")
            await client.flushall()
            done = backend.resyncs
            await eventually(lambda: backend.resyncs >= done + 3, timeout=2, what="3 resyncs")
            assert view.get("r2") is not None


@pytest.mark.anyio
@needs_redis
async def test_an_outage_is_reported_once_and_redis_is_repopulated_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import redis.asyncio as redis

    from anyserve.api_server.registry_redis import REPLICA_PREFIX

    caplog.set_level(logging.INFO, logger="anyserve.api_server.registry_redis")
    view = Registry(ttl=5)
    server = RedisServer(tmp_path)
    try:
        await server.start()
        async with following(server.url, view, interval=0.1) as backend:
            replica, _ = view.upsert("r1", "127.0.0.1:1", [Capability(type="chat")])
            backend.stored(replica)
            await server.kill()
            await eventually(lambda: not backend.connected, timeout=3, what="outage seen")
            status = backend.status()
            assert status["connected"] is False and status["error"]
            failed = backend.failures
            await eventually(lambda: backend.failures >= failed + 3, timeout=5, what="retries")
            assert view.get("r1") is not None  # routing goes on with the last view
            lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
            assert len(lost) == 1

            await server.start()  # empty, on the same port
            await eventually(lambda: backend.connected, timeout=5, what="reconnected")
            async with redis.Redis.from_url(server.url) as client:
                await eventually(
                    lambda: client.exists(REPLICA_PREFIX + "r1"),
                    timeout=2,
                    what="r1 written again after the outage",
                )
            assert any("is back" in r.getMessage() for r in caplog.records)
    finally:
        await server.kill()
