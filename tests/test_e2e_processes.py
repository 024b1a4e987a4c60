"""Processes end to end: tests that kill or restart something, each with its
own API server and replicas.

Two replicas share the load and the survivor serves alone after a kill -9;
replicas reappear after the API server restarts; and ``anyserve run`` is
tested as the user runs it: a separate process, stopped with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from anyserve.proto import ModelInferRequest
from anyserve.testing import GrpcClient, start_replica
from tests.api_calls import (
    CHAT,
    EMPTY,
    HEAVY,
    infer,
    outputs,
    pb_served_by,
    registry_ids,
    served_by,
    stream_events,
    text_body,
    tokens,
)
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent


def anyserve_command() -> list[str]:
    """The ``anyserve`` console script of this environment (else ``python -m``)."""
    script = Path(sys.executable).parent / "anyserve"
    return [str(script)] if script.exists() else [sys.executable, "-m", "anyserve.cli"]


async def spawn(argv: list[str], log: Path) -> anyio.abc.Process:
    """Start a process in its own session (its own process group) from the repo
    root, so that ``examples.*`` imports and one killpg reaches its workers."""
    with log.open("wb") as out:
        return await anyio.open_process(
            argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def kill_group(proc: anyio.abc.Process) -> None:
    """SIGKILL a spawned process and everything in its group, then reap it."""
    with anyio.CancelScope(shield=True):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with anyio.move_on_after(10):
            await proc.wait()


def live_processes(pgid: int, marker: str) -> list[str]:
    """Processes (not zombies) in process group ``pgid`` or whose command line
    mentions ``marker``: what a stopped system must not leave behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            )
        except OSError:
            continue  # exited while we looked
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z" and (int(pgrp) == pgid or marker in cmdline):
            found.append(f"{entry.name}: {cmdline.strip()}")
    return found


# --------------------------------------------------------------------------- load and kill -9


async def test_two_replicas_share_load_and_survive_kill_9(tmp_path: Path) -> None:
    config = ApiServerConfig(port=0, grpc_port=0, token=None, heartbeat_interval=0.3)
    procs: list[anyio.abc.Process] = []
    async with ApiServer(config) as api, httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        try:
            for name in ("heavy-a", "heavy-b"):
                argv = [
                    *anyserve_command(),
                    "start",
                    "--app",
                    "examples.heavy_app:app",
                    "--port",
                    "0",  # it registers the port it got
                    "--api-server",
                    api.url,
                    "--replica-id",
                    name,
                    "--object-store",
                    str(tmp_path / "objects"),
                    "--log-level",
                    "warning",
                ]
                procs.append(await spawn(argv, tmp_path / f"{name}.log"))

            async def both_registered() -> bool:
                for name, proc in zip(("heavy-a", "heavy-b"), procs, strict=True):
                    assert proc.returncode is None, (tmp_path / f"{name}.log").read_text()
                return await registry_ids(http) == {"heavy-a", "heavy-b"}

            await eventually(both_registered, timeout=30)

            served: Counter[str] = Counter()

            async def one() -> None:
                served[served_by(await infer(http, HEAVY))] += 1

            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
            assert sum(served.values()) == 40
            assert served["heavy-a"] > 0 and served["heavy-b"] > 0, served

            victim = procs[0]
            os.killpg(victim.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                await victim.wait()
            killed = anyio.current_time()

            async def dead_entry_expired() -> bool:
                # Until the dead entry expires, and after, every request succeeds
                # on the survivor (a dead endpoint is skipped at connect time).
                if "heavy-a" not in await registry_ids(http):
                    return True
                assert served_by(await infer(http, HEAVY)) == "heavy-b"
                return False

            # Back to back (no pause): as many requests as fit until it expires.
            await eventually(dead_entry_expired, timeout=config.effective_ttl + 5, interval=0)
            gone_after = anyio.current_time() - killed
            assert gone_after <= config.effective_ttl + 0.5, gone_after
            for _ in range(10):
                assert served_by(await infer(http, HEAVY)) == "heavy-b"
        finally:
            for proc in procs:
                await kill_group(proc)


# --------------------------------------------------------------------------- API server restart


async def _serve_api(
    config: ApiServerConfig,
    stop: anyio.Event,
    stopped: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[ApiServer] = anyio.TASK_STATUS_IGNORED,
) -> None:
    # Each server in a task of its own: its task group must not interleave
    # with the replicas' (they outlive the first server).
    try:
        async with ApiServer(config) as server:
            task_status.started(server)
            await stop.wait()
    finally:
        stopped.set()


async def test_replicas_reappear_after_api_server_restart() -> None:
    interval = 0.5

    def config(port: int) -> ApiServerConfig:
        return ApiServerConfig(port=port, grpc_port=0, token=None, heartbeat_interval=interval)

    async with anyio.create_task_group() as servers:
        stop_first, stop_second = anyio.Event(), anyio.Event()
        first_stopped = anyio.Event()
        try:
            first: ApiServer = await servers.start(_serve_api, config(0), stop_first, first_stopped)
            url, port = first.url, first.http_port
            async with (
                start_replica(
                    "examples.heavy_app:app", api_server=url, replica_id="r-heavy"
                ) as heavy,
                start_replica(
                    "examples.embed_app:app", api_server=url, replica_id="r-embed"
                ) as embed,
                httpx.AsyncClient(base_url=url, timeout=10) as http,
            ):
                for replica in (heavy, embed):
                    assert replica.registration is not None
                    with anyio.fail_after(30):
                        await replica.registration.wait_registered()
                assert await registry_ids(http) == {"r-heavy", "r-embed"}

                stop_first.set()
                with anyio.fail_after(10):
                    await first_stopped.wait()
                # (No pytest.raises inside task groups: its failure is a
                # BaseException, which would take anyio's test runner down.)
                refused = False
                try:
                    await http.get("/registry")
                except httpx.ConnectError:
                    refused = True
                assert refused, "the first API server still answers"

                second: ApiServer = await servers.start(
                    _serve_api, config(port), stop_second, anyio.Event()
                )
                assert second.url == url

                async def back() -> bool:
                    return await registry_ids(http) == {"r-heavy", "r-embed"}

                took = await eventually(back, timeout=10)
                assert took <= interval + 1.0, took
                assert served_by(await infer(http, HEAVY)) == "r-heavy"
                # The replicas learnt the new gRPC entry: delegation goes through it.
                request = ModelInferRequest(id="after-restart")
                async with GrpcClient(embed.endpoint) as client:
                    response = await client.infer(request, capability={"type": "heavy"})
                assert pb_served_by(response) == "r-heavy"
        finally:
            stop_first.set()
            stop_second.set()


# --------------------------------------------------------------------------- anyserve run


async def test_anyserve_run_serves_then_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    marker = f"anyserve-run-{uuid.uuid4().hex}"
    store = tmp_path / marker  # on every command line of the run: its workers' too
    port, grpc_port = free_port(), free_port()
    argv = [
        *anyserve_command(),
        "run",
        "examples.chat_app:app",
        "examples.stream_app:app",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        "--object-store",
        str(store),
        "--log-level",
        "warning",
    ]
    log = tmp_path / "run.log"
    proc = await spawn(argv, log)
    pgid = proc.pid
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

            async def up() -> bool:
                assert proc.returncode is None, log.read_text()
                try:
                    if (await http.get("/health")).status_code != 200:
                        return False
                    return len(await registry_ids(http)) == 2
                except httpx.TransportError:
                    return False

            await eventually(up, timeout=40)
            doc = await infer(http, CHAT, text_body("text_input", "hi"))
            assert outputs(doc)["output"] == "Hello, world!"
            events = await stream_events(http, "/infer/stream", CHAT, EMPTY)
            assert tokens(events) == ["Hello", " ", "world", "!"]
            assert events[-1] == ("done", "[DONE]")
        assert len(live_processes(pgid, marker)) >= 5  # run + 4 workers at least

        os.killpg(pgid, signal.SIGINT)  # what Ctrl-C in a terminal does
        with anyio.fail_after(15):
            await proc.wait()
        assert proc.returncode == 0, log.read_text()
        await eventually(lambda: not live_processes(pgid, marker), timeout=5)
        # Worker start-ups fork while gRPC runs: no noise from gRPC about it.
        assert "fork_posix" not in log.read_text()
    finally:
        await kill_group(proc)
