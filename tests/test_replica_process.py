"""`anyserve start` as a real OS process: graceful shutdown on SIGTERM and SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import grpc
import pytest

from anyserve import codec
from anyserve._proto import admin_pb2 as apb
from anyserve.proto import ModelInferRequest
from anyserve.replica import admin
from anyserve.testing import GrpcClient
from tests.support import eventually, free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def replica_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "anyserve.cli", "start",
            "--app", "tests.apps.forms_app:app",
            "--port", str(port),
            "--object-store", str(tmp_path / "objects"),
            "--grace", "10",
        ],
        cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def wait_serving(endpoint: str) -> list[int]:
    """Wait until the replica answers the admin service; return its worker pids."""
    pids: list[int] = []
    async with GrpcClient(endpoint) as client:
        method = client.channel.unary_unary(
            admin.LIST_WORKERS,
            request_serializer=apb.ListWorkersRequest.SerializeToString,
            response_deserializer=apb.WorkersReply.FromString,
        )

        async def workers_ready() -> bool:
            try:
                reply = await method(apb.ListWorkersRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False  # not serving yet
            pids[:] = [w.pid for w in reply.workers]
            return bool(reply.workers) and all(w.state == "ready" for w in reply.workers)

        await eventually(workers_ready, timeout=60, interval=0.05)
    return pids


async def wait_in_flight(client: GrpcClient, handler: str) -> None:
    """Poll the admin service until ``handler`` has a call in flight."""
    method = client.channel.unary_unary(
        admin.LIST_WORKERS,
        request_serializer=apb.ListWorkersRequest.SerializeToString,
        response_deserializer=apb.WorkersReply.FromString,
    )

    async def busy() -> bool:
        reply = await method(apb.ListWorkersRequest(), timeout=2)
        return any(w.handler == handler and w.inflight for w in reply.workers)

    await eventually(busy, timeout=10, what=f"a call in flight on handler {handler!r}")


def request(text: str) -> ModelInferRequest:
    req = ModelInferRequest(id="drain")
    req.inputs.append(codec.encode_input("text_input", text))
    return req


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_in_flight_calls_then_stops_workers(
    replica_process: tuple[subprocess.Popen[bytes], str], signum: signal.Signals
) -> None:
    proc, endpoint = replica_process
    worker_pids = await wait_serving(endpoint)
    assert len(worker_pids) >= 10 and all(alive(p) for p in worker_pids)
    results: list[bytes] = []
    async with GrpcClient(endpoint) as client, anyio.create_task_group() as tg:

        async def in_flight() -> None:
            response = await client.infer(request("1.5"), capability={"type": "sleepy"})
            results.append(codec.decode_outputs(response)["text_output"])

        tg.start_soon(in_flight)
        await wait_in_flight(client, "sleepy")
        os.kill(proc.pid, signum)
    # The call that was in flight when the signal came completed normally.
    assert results == [b"rested"]
    code = await anyio.to_thread.run_sync(lambda: proc.wait(timeout=20))
    assert code == 0
    await eventually(lambda: not any(alive(p) for p in worker_pids), timeout=5)
