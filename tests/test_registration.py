"""The replica's registration client against a real API server."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import httpx
import pytest

from anyserve.replica.registration import Registration
from tests.fake_replica import running_api
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio


def body_for(caps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"replica_id": "rep", "endpoint": "127.0.0.1:50051", "capabilities": caps}


async def registry(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    replicas: list[dict[str, Any]] = (await http.get("/registry")).json()["replicas"]
    return replicas


async def test_registers_heartbeats_notifies_and_unregisters() -> None:
    caps = [{"type": "chat"}]
    async with (
        running_api(heartbeat_interval=0.05, ttl=0.3) as api,
        httpx.AsyncClient(base_url=api.url) as http,
        Registration(api.url, lambda: body_for(caps), interval=30) as reg,
        anyio.create_task_group() as tg,
    ):
        assert reg.grpc_endpoint is None and not reg.registered
        tg.start_soon(reg.run)
        with anyio.fail_after(2):
            await reg.wait_registered()
        assert reg.grpc_endpoint == api.grpc_endpoint
        assert reg.interval == 0.05  # the server's interval wins
        await anyio.sleep(0.6)  # two TTLs: only heartbeats keep it there
        assert [r["replica_id"] for r in await registry(http)] == ["rep"]

        caps.append({"type": "embed"})
        reg.notify()

        async def updated() -> bool:
            found = await registry(http)
            return bool(found) and len(found[0]["capabilities"]) == 2

        await eventually(updated, timeout=1)
        tg.cancel_scope.cancel()
        await reg.unregister()
        assert await registry(http) == []


async def test_notify_is_immediate_with_a_long_interval() -> None:
    caps = [{"type": "chat"}]
    async with (
        running_api(heartbeat_interval=30) as api,
        httpx.AsyncClient(base_url=api.url) as http,
        Registration(api.url, lambda: body_for(caps)) as reg,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(reg.run)
        await reg.wait_registered()
        caps[0] = {"type": "other"}
        reg.notify()
        reg.notify()  # coalesced

        async def updated() -> bool:
            return bool((await registry(http))[0]["capabilities"] == [{"type": "other"}])

        await eventually(updated, timeout=1)
        tg.cancel_scope.cancel()


async def test_reregisters_after_the_api_server_restarts_on_the_same_port() -> None:
    async with running_api(heartbeat_interval=0.1) as first:
        port = first.http_port
        reg = Registration(first.url, lambda: body_for([{"type": "chat"}]), interval=0.1)
    async with reg, anyio.create_task_group() as tg:
        tg.start_soon(reg.run)
        # Nothing listens: failures are retried, the first one logged.
        for _ in range(2):  # the server goes away and comes back: no operator action
            async with (
                running_api(port=port, heartbeat_interval=0.1) as api,
                httpx.AsyncClient(base_url=api.url) as http,
            ):

                async def back(http: httpx.AsyncClient = http) -> bool:
                    return len(await registry(http)) == 1

                await eventually(back, timeout=2)
                assert reg.registered and reg.grpc_endpoint == api.grpc_endpoint
        tg.cancel_scope.cancel()


async def test_wrong_token_is_logged_once_and_unregister_is_quick(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        api.config.token = "right"
        reg = Registration(api.url, lambda: body_for([]), token="wrong", interval=0.02)
        async with reg, anyio.create_task_group() as tg:
            with caplog.at_level(logging.WARNING, logger="anyserve.replica.registration"):
                tg.start_soon(reg.run)

                def warned() -> bool:
                    return any("registration" in r.getMessage() for r in caplog.records)

                await eventually(warned, timeout=5)
                await anyio.sleep(0.2)  # ~10 more refused attempts: none is logged again
                tg.cancel_scope.cancel()
        assert not reg.registered and await registry(http) == []
        warnings = [r for r in caplog.records if "registration" in r.getMessage()]
        assert len(warnings) == 1 and "401" in warnings[0].getMessage()

        good = Registration(api.url, lambda: body_for([]), token="right")
        async with good:
            assert await good.register_once()
            assert len(await registry(http)) == 1

    dead = f"http://127.0.0.1:{free_port()}"
    async with Registration(dead, lambda: body_for([])) as gone:
        with anyio.fail_after(1.5):
            await gone.unregister()  # best effort, never raises
