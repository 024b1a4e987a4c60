"""Several API servers on one Redis registry, end to end with real processes:
a private redis-server, API server processes (``--registry redis://...``) and
replica processes (``anyserve start``) with their workers.

Heartbeats are every 0.2s (TTL 0.6s) so that expiry and failover take
about a second.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest

from anyserve import codec
from anyserve.proto import ModelInferRequest
from anyserve.testing import GrpcClient
from tests.api_calls import CHAT, pb_served_by, served_by, text_body
from tests.support import eventually, free_port
from tests.unit.test_registry_redis import RedisServer, needs_redis, redis_server

pytestmark = [pytest.mark.anyio, needs_redis]

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.2
TTL = 3 * INTERVAL


@dataclass
class Proc:
    url: str
    proc: anyio.abc.Process


async def _answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


@asynccontextmanager
async def _process(args: list[str], log: Path) -> AsyncIterator[anyio.abc.Process]:
    with log.open("wb") as out:
        proc = await anyio.open_process(
            [sys.executable, "-m", "anyserve.cli", *args], cwd=ROOT, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


@asynccontextmanager
async def api_server(redis_url: str, log: Path) -> AsyncIterator[Proc]:
    port = free_port()
    args = ["api-server", "--port", str(port), "--grpc-port", "0", "--grace", "1",
            "--heartbeat-interval", str(INTERVAL), "--registry", redis_url]  # fmt: skip
    async with _process(args, log) as proc:
        url = f"http://127.0.0.1:{port}"
        await eventually(lambda: _answers(url), timeout=20, what=f"API server {url} up")
        yield Proc(url, proc)


@asynccontextmanager
async def replica(app: str, replica_id: str, api_urls: str, log: Path) -> AsyncIterator[Proc]:
    port = free_port()
    args = ["start", "--app", app, "--port", str(port), "--replica-id", replica_id,
            "--api-server", api_urls, "--object-store", str(log.parent / "objects"),
            "--grace", "1"]  # fmt: skip
    async with _process(args, log) as proc:
        yield Proc(f"127.0.0.1:{port}", proc)


async def registered(url: str) -> list[str]:
    async with httpx.AsyncClient(timeout=2) as http:
        replicas = (await http.get(f"{url}/registry")).json()["replicas"]
    return sorted(r["replica_id"] for r in replicas)


async def health(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=2) as http:
        doc: dict[str, Any] = (await http.get(f"{url}/health")).json()
    return doc


async def chat(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.post(f"{url}/infer", headers=CHAT, json=text_body("text_input", "hi"))


def in_all(urls: list[str], replica_ids: list[str]) -> Any:
    async def check() -> bool:
        return all([await registered(u) == replica_ids for u in urls])

    return check


@asynccontextmanager
async def two_api_servers(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Proc, Proc]]:
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(redis_server(tmp_path))
        one = await stack.enter_async_context(api_server(redis.url, tmp_path / "api1.log"))
        two = await stack.enter_async_context(api_server(redis.url, tmp_path / "api2.log"))
        yield redis, one, two


async def test_a_replica_registered_through_one_serves_through_the_other_until_killed(
    tmp_path: Path,
) -> None:
    async with (
        two_api_servers(tmp_path) as (_, one, two),
        replica("examples.chat_app:app", "chat", one.url, tmp_path / "chat.log") as chat_replica,
    ):
        await eventually(in_all([one.url, two.url], ["chat"]), timeout=30, what="chat in both")
        response = await chat(two.url)
        assert response.status_code == 200, response.text
        assert served_by(response.json()) == "chat"

        chat_replica.proc.send_signal(signal.SIGKILL)
        took = await eventually(in_all([one.url, two.url], []), timeout=5, what="gone in both")
        assert took < TTL + 1.0  # the TTL, plus a sweep and a poll
        assert (await chat(two.url)).status_code == 404


async def test_a_replica_fails_over_when_its_api_server_is_killed(tmp_path: Path) -> None:
    async with two_api_servers(tmp_path) as (_, one, two):
        both = f"{one.url},{two.url}"
        async with (
            replica("examples.chat_app:app", "chat", both, tmp_path / "chat.log") as chat_replica,
            replica("examples.embed_app:app", "embed", both, tmp_path / "embed.log"),
        ):
            await eventually(
                in_all([one.url, two.url], ["chat", "embed"]), timeout=30, what="both in both"
            )
            # Delegation: the chat replica hands an embed request to its API server.
            embed = ModelInferRequest(id="d")
            embed.inputs.append(codec.encode_input("text", "hello"))

            async def delegated() -> bool:
                async with GrpcClient(chat_replica.url) as client:
                    answer = await client.infer(embed, capability={"type": "embed"}, timeout=5)
                return pb_served_by(answer) == "embed"

            assert await delegated()

            one.proc.send_signal(signal.SIGKILL)
            await one.proc.wait()
            # Requests through the survivor all succeed, for several TTLs: the
            # replicas' heartbeats moved to it (or they would expire).
            deadline = anyio.current_time() + 3 * TTL
            count = 0
            while anyio.current_time() < deadline:
                response = await chat(two.url)
                assert response.status_code == 200, response.text
                count += 1
            assert count > 5
            assert await registered(two.url) == ["chat", "embed"]
            # The chat replica learned the survivor's gRPC entry from its heartbeat.
            await eventually(delegated, timeout=2 * INTERVAL + 2, what="delegation via API 2")
            assert await delegated()


async def test_redis_lost_and_restarted_empty(tmp_path: Path) -> None:
    import redis.asyncio as redis_client

    from anyserve.api_server.registry_redis import REPLICA_PREFIX

    async with (
        two_api_servers(tmp_path) as (redis, one, two),
        replica("examples.chat_app:app", "chat", one.url, tmp_path / "chat.log"),
    ):
        urls = [one.url, two.url]
        await eventually(in_all(urls, ["chat"]), timeout=30, what="chat in both")
        assert all([(await health(u))["registry"]["connected"] for u in urls])

        await redis.kill()

        async def outage_shown() -> bool:
            states = [(await health(u))["registry"] for u in urls]
            return all(s["backend"] == "redis" and s["connected"] is False for s in states)

        await eventually(outage_shown, timeout=5, what="/health shows the outage")
        assert all([(await health(u))["registry"]["error"] for u in urls])
        # Routing goes on through both, for longer than the TTL.
        deadline = anyio.current_time() + 2 * TTL
        while anyio.current_time() < deadline:
            for url in urls:
                response = await chat(url)
                assert response.status_code == 200, response.text

        await redis.start()  # a fresh, empty Redis on the same port

        async def repopulated() -> bool:
            async with redis_client.Redis.from_url(redis.url) as client:
                stored = await client.exists(REPLICA_PREFIX + "chat")
            states = [await health(u) for u in urls]
            ages = [await ages_of(u) for u in urls]
            return (
                bool(stored)
                and all(s["registry"]["connected"] and s["replicas"] == 1 for s in states)
                and all(age < 2 * INTERVAL for age in ages)
            )

        took = await eventually(repopulated, timeout=5, what="Redis and both views repopulated")
        assert took < 2.0
        for url in urls:
            assert (await chat(url)).status_code == 200


async def ages_of(url: str) -> float:
    async with httpx.AsyncClient(timeout=2) as http:
        replicas = (await http.get(f"{url}/registry")).json()["replicas"]
    return float(max(r["last_heartbeat_age"] for r in replicas))
