"""SIGTERM on a real API server process: in-flight unary calls and streams
finish within --grace; what is still running after it ends with a proper
error (503 JSON, ``event: error``), never a cut connection."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from anyserve.testing import start_replica
from tests.api_calls import text_body
from tests.support import eventually, free_port, sse_events

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@asynccontextmanager
async def api_server_process(grace: float) -> AsyncIterator[tuple[str, anyio.abc.Process]]:
    port = free_port()
    proc = await anyio.open_process(
        [sys.executable, "-m", "anyserve.cli", "api-server", "--port", str(port),
         "--grpc-port", "0", "--grace", str(grace)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(up, timeout=20, what="the API server answers /health")
        async with start_replica("tests.apps.forms_app:app", api_server=url):
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:

                async def registered() -> bool:
                    return bool((await http.get("/registry")).json()["replicas"])

                await eventually(registered, timeout=20, what="the replica registered")
            yield url, proc
    finally:
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


async def in_flight(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        replicas = (await http.get("/registry")).json()["replicas"]
    return sum(int(r.get("in_flight", 0)) for r in replicas)


async def at_least(url: str, count: int) -> bool:
    return await in_flight(url) >= count


async def exits(proc: anyio.abc.Process) -> int:
    with anyio.fail_after(20):
        return await proc.wait()


async def stream(url: str, gate: Path, out: list[list[tuple[str, str]]]) -> None:
    headers = {"X-Capability-Type": "gen", "X-Capability-Form": "gated"}
    body = text_body("text_input", str(gate))
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as http,
        http.stream("POST", "/infer/stream", headers=headers, json=body) as response,
    ):
        assert response.status_code == 200
        out.append([event async for event in sse_events(response)])


async def unary(url: str, seconds: float, out: list[httpx.Response]) -> None:
    headers = {"X-Capability-Type": "sleepy"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        out.append(
            await http.post("/infer", headers=headers, json=text_body("text_input", str(seconds)))
        )


def texts(events: list[tuple[str, str]]) -> list[Any]:
    return [json.loads(data)["outputs"][0]["data"][0] for kind, data in events if kind == "message"]


async def test_sigterm_lets_in_flight_calls_and_streams_finish(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    answers: list[httpx.Response] = []
    streams: list[list[tuple[str, str]]] = []
    async with api_server_process(grace=20) as (url, proc):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(unary, url, 2.0, answers)
            for _ in range(2):
                tg.start_soon(stream, url, gate, streams)
            await eventually(lambda: at_least(url, 5), timeout=10, what="5 requests in flight")
            proc.send_signal(signal.SIGTERM)
            await anyio.sleep(0.3)  # part of the scenario: the streams wait on their gate
            gate.write_text("open")
        assert await exits(proc) == 0
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert all(r.json()["outputs"][0]["data"] == ["rested"] for r in answers)
    assert len(streams) == 2
    for events in streams:
        assert texts(events) == ["first", "second"]
        assert events[-1] == ("done", "[DONE]")


async def test_what_outlives_the_grace_ends_with_a_proper_error(tmp_path: Path) -> None:
    gate = tmp_path / "never"
    answers: list[httpx.Response] = []
    streams: list[list[tuple[str, str]]] = []
    async with api_server_process(grace=1) as (url, proc):
        async with anyio.create_task_group() as tg:
            tg.start_soon(unary, url, 8.0, answers)
            tg.start_soon(stream, url, gate, streams)
            await eventually(lambda: at_least(url, 2), timeout=10, what="2 requests in flight")
            proc.send_signal(signal.SIGTERM)
        assert await exits(proc) == 0
    assert answers[0].status_code == 503
    assert "shutting down" in answers[0].json()["error"]
    events = streams[0]
    assert texts(events) == ["first"]
    assert events[-1][0] == "error" and "shutting down" in json.loads(events[-1][1])["error"]
