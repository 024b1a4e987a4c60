"""Which start timeout each wait for a starting worker uses: the handler's own
``start_timeout`` when it has one, else the replica's (default 600 s).

The worker processes are replaced by a runner that never says hello (the
slot stays STARTING until it is stopped); the real processes, the progress
lines and the kill are tests/test_worker_start.py's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import anyio
import pytest

from anyserve._proto import admin_pb2 as apb
from anyserve.app import HandlerInfo
from anyserve.capability import Capability
from anyserve.errors import Unavailable
from anyserve.replica.admin import AdminServicer
from anyserve.replica.manager import Manager
from anyserve.replica.processes import DEFAULT_START_TIMEOUT, WorkerConfig, seconds
from anyserve.replica.server import ReplicaConfig
from anyserve.replica.slot import Slot, State

pytestmark = pytest.mark.anyio

# The replica's default in these tests: any wait that used it would time the test out.
REPLICA_TIMEOUT = 30.0
OWN = 0.2


def handler(name: str, *, start_timeout: float | None, preload: bool = True) -> HandlerInfo:
    return HandlerInfo(
        name=name,
        capability=Capability({"type": name}),
        stream=False,
        preload=preload,
        start_timeout=start_timeout,
    )


async def never_ready(slot: Slot) -> str:
    """A worker process that never finishes loading (until it is stopped)."""
    await slot.stop_requested.wait()
    return "stopped"


@asynccontextmanager
async def running(*handlers: HandlerInfo) -> AsyncIterator[tuple[Manager, float]]:
    """A manager whose workers never get ready; yields it and the seconds its
    start (the preload wait) took."""
    config = WorkerConfig(app="unused:app", start_timeout=REPLICA_TIMEOUT)
    manager = Manager(list(handlers), config)
    manager.supervisor.run_worker = never_ready
    async with anyio.create_task_group() as tg:
        begun = anyio.current_time()
        with anyio.fail_after(10):
            await tg.start(manager.run)
        try:
            yield manager, anyio.current_time() - begun
        finally:
            manager.stop()


class Aborted(Exception):
    """What FakeContext.abort raises, as grpc.aio's abort() does."""


class FakeContext:
    """What the admin service uses of a grpc.aio servicer context: a call
    without a deadline."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def abort(self, code: Any, message: str, trailers: Any = ()) -> NoReturn:
        raise Aborted(f"{code.name}: {message}")


def test_the_handlers_own_timeout_wins_else_the_replicas() -> None:
    config = WorkerConfig(app="unused:app", start_timeout=REPLICA_TIMEOUT)
    assert config.start_timeout_for(handler("a", start_timeout=OWN)) == OWN
    assert config.start_timeout_for(handler("b", start_timeout=None)) == REPLICA_TIMEOUT
    assert WorkerConfig(app="unused:app").start_timeout == DEFAULT_START_TIMEOUT == 600.0
    assert ReplicaConfig(app="unused:app").start_timeout == DEFAULT_START_TIMEOUT


def test_seconds_read_naturally() -> None:
    cases = {600.0: "600", 40.04: "40", 0.5: "0.5", 12.345: "12.3", 10: "10"}
    assert {value: seconds(value) for value in cases} == cases


async def test_the_preload_wait_ends_after_the_handlers_own_timeout() -> None:
    async with running(handler("slow", start_timeout=OWN)) as (manager, took):
        # The handler's 0.2 s (plus a second for the kill), not the replica's 30 s.
        assert OWN < took < OWN + 3
        (slot,) = manager.slots["slow"]
        assert slot.state is State.STARTING


async def test_acquire_without_a_deadline_gives_up_after_the_handlers_own_timeout() -> None:
    async with running(handler("slow", start_timeout=OWN, preload=False)) as (manager, _):
        begun = anyio.current_time()
        with pytest.raises(Unavailable) as late, anyio.fail_after(5):
            await manager.acquire("slow")
        assert OWN <= anyio.current_time() - begun < 3
        assert late.value.message == "handler slow has no ready worker after 0.2 s (start timeout)"


async def test_workers_start_without_a_deadline_waits_the_handlers_own_timeout() -> None:
    async with running(handler("slow", start_timeout=OWN, preload=False)) as (manager, _):
        admin = AdminServicer(manager, "r1", token=None)
        begun = anyio.current_time()
        with pytest.raises(Aborted) as still, anyio.fail_after(5):
            await admin.start_worker(apb.StartWorkerRequest(capability="slow"), FakeContext())
        assert OWN <= anyio.current_time() - begun < 3
        assert str(still.value).startswith("DEADLINE_EXCEEDED: workers are still starting")
        assert manager.slots["slow"][0].state is State.STARTING
