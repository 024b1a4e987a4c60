"""No process imports a heavy library it does not use: real processes.

An API server and a replica are started as a user starts them (``anyserve
api-server``, ``anyserve start``) with ``-X importtime`` on their own command lines,
serve one request to a trivial handler, and stop; every module each one imported
on the way is in its importtime output. The worker reports its own ``sys.modules``
in its answer (it does not inherit the replica's ``-X`` flag), after its import and
one call. Memory is the reason (an idle worker is ~25 MiB of interpreter, a module
like numpy or grpc ~10 MiB more; ``benchmarks/bench_memory.py`` has the figures), but
resident sizes depend on the machine, so only the imports are pinned here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.abc
import httpx
import pytest

from tests.api_calls import outputs, registry_ids
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent

# Never in any of the three: test-only dependencies and the optional heavy ones.
EVERYWHERE = {"numpy", "tritonclient", "openai", "redis"}
# Tracing is off (no OTEL_* variables): nobody loads OpenTelemetry. httpx's own
# command line (rich, pygments) is never run.
NOT_USED = {"opentelemetry", "rich", "pygments"}
API_SERVER = EVERYWHERE | NOT_USED | {"httpx", "aiofiles"}
# A replica serves gRPC: no HTTP server, no Prometheus without --metrics-port.
REPLICA = EVERYWHERE | NOT_USED | {"starlette", "uvicorn", "sse_starlette", "prometheus_client"}
# A worker speaks only to its replica, over a socket: no gRPC until it calls out,
# no HTTP, no command line, no metrics library, no file I/O library while idle.
WORKER = (
    EVERYWHERE
    | NOT_USED
    | {"grpc", "httpx", "starlette", "uvicorn", "sse_starlette", "prometheus_client"}
    | {"typer", "click", "pydantic", "aiofiles"}
)


def _mapped(pid: int, library: str) -> bool:
    """Whether process ``pid`` has a shared object of ``library`` mapped."""
    with open(f"/proc/{pid}/maps", encoding="utf-8") as f:
        return library in f.read()


def _argv(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")


def imported(importtime: str) -> set[str]:
    """The top-level packages named in ``-X importtime`` output."""
    found = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and "imported package" not in line:
            found.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return found


@contextlib.asynccontextmanager
async def serving(argv: list[str], log: Path) -> AsyncIterator[anyio.abc.Process]:
    """``python -X importtime -m anyserve.cli ARGV`` in its own session, its output
    in ``log``; stopped with SIGINT (a graceful stop) on the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PYTHONPROFILE"))}
    command = [sys.executable, "-X", "importtime", "-m", "anyserve.cli", *argv]
    with log.open("wb") as out:
        proc = await anyio.open_process(
            command,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
        proc.send_signal(signal.SIGINT)
        with anyio.fail_after(30):
            await proc.wait()
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with anyio.move_on_after(10):
                await proc.wait()


async def test_each_process_imports_only_what_it_uses(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api_log, replica_log = tmp_path / "api.log", tmp_path / "replica.log"
    api_argv = ["api-server", "--port", str(port), "--grpc-port", "0", "--log-level", "warning"]
    replica_argv = [
        *("start", "--app", "tests.apps.lean_app:app", "--port", "0", "--api-server", url),
        *("--replica-id", "lean", "--object-store", str(tmp_path / "objects")),
        *("--log-level", "warning"),
    ]
    async with (
        serving(api_argv, api_log) as api,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):

        async def api_up() -> bool:
            assert api.returncode is None, api_log.read_text()
            with contextlib.suppress(httpx.TransportError):
                return (await http.get("/health")).status_code == 200
            return False

        await eventually(api_up, timeout=30)
        async with serving(replica_argv, replica_log) as replica:
            answer: dict[str, str] = {}

            async def served() -> bool:
                assert replica.returncode is None, replica_log.read_text()
                if "lean" not in await registry_ids(http):
                    return False
                response = await http.post(
                    "/infer", headers={"X-Capability-Type": "lean"}, json={"inputs": []}
                )
                if response.status_code != 200:  # the worker may still be starting
                    return False
                answer.update(outputs(response.json()))
                return True

            await eventually(served, timeout=60)
            # Parsing the command line loaded typer, click and pydantic; the
            # servers were then exec'd into interpreters without them.
            for proc in (api, replica):
                assert not _mapped(proc.pid, "pydantic_core"), "a server still holds pydantic"
                argv = _argv(proc.pid)
                assert b"anyserve.launch" in argv and b"--" in argv, argv
    worker_modules = {name.split(".")[0] for name in answer["text_output"].split("\n")}
    api_modules, replica_modules = imported(api_log.read_text()), imported(replica_log.read_text())
    assert "anyserve" in api_modules and "grpc" in replica_modules, "no importtime output?"
    assert "anyserve" in worker_modules
    assert API_SERVER & api_modules == set(), "the API server imported these"
    assert REPLICA & replica_modules == set(), "the replica imported these"
    assert WORKER & worker_modules == set(), "the worker imported these"
