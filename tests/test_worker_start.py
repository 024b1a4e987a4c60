"""Workers that take long to start, end to end: real replicas, worker
processes, API server and CLI on loopback.

While a worker loads, the replica logs its progress and shows it ``starting``
(``/registry``, ``anyserve workers list``); a worker over its start timeout
(its handler's own, else the replica's ``--start-timeout``) is killed with a
warning and counted as a crash: restarted, then failed. The progress interval
and the timeouts are short here; readiness is polled, never slept for.
"""

from __future__ import annotations

import logging
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from anyserve.api_server.config import ApiServerConfig
from anyserve.cluster import Cluster, start_cluster
from anyserve.replica.supervisor import RestartPolicy
from tests.apps.workers_loading_app import GATE, STUCK_START_TIMEOUT
from tests.support import eventually
from tests.test_cli import anyserve_process, read_until
from tests.test_workers import (
    body,
    cli,
    http_to,
    json_output,
    manager_of,
    offered,
    pid_alive,
    registry_until,
    row,
    workers_of,
)

pytestmark = pytest.mark.anyio

LOADING_APP = "tests.apps.workers_loading_app:app"
STUCK_APP = "tests.apps.workers_stuck_app:app"
# The replica's own start timeout here: long, so only a handler's own ends a start sooner.
REPLICA_TIMEOUT = 30.0
PROGRESS = 0.1  # seconds between "still loading" lines


def manager_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    """What the replica logged about its workers at ``level``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "anyserve.manager" and r.levelno == level
    ]


@asynccontextmanager
async def loading_cluster(gate: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv(GATE, str(gate))  # the workers inherit it
    options = {
        "grace": 2.0,
        "start_timeout": REPLICA_TIMEOUT,
        "start_progress_interval": PROGRESS,
    }
    api = ApiServerConfig(port=0, grpc_port=0, heartbeat_interval=5.0, token=None)
    async with start_cluster([LOADING_APP], api=api, replica_options=options) as cluster:
        yield cluster


async def test_a_loading_worker_logs_progress_and_shows_starting_until_it_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="anyserve.manager")
    gate = tmp_path / "model-loaded"
    async with loading_cluster(gate, monkeypatch) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        rid, slots = replica.replica_id, manager_of(replica).slots["slow_load"]
        answers: list[httpx.Response] = []

        async def first_request() -> None:
            headers = {"X-Capability-Type": "slow_load", "X-Request-Timeout": "30"}
            answers.append(await http.post("/infer", headers=headers, json=body()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first_request)  # starts the worker on demand and waits for it
            await eventually(lambda: slots and slots[0].pid is not None)
            pid = slots[0].pid
            progress = f"worker slow_load-0 (pid {pid}) still loading, "
            await eventually(
                lambda: len([m for m in manager_lines(caplog) if m.startswith(progress)]) >= 2
            )
            line = next(m for m in manager_lines(caplog) if m.startswith(progress))
            assert re.fullmatch(re.escape(progress) + r"[0-9.]+ s of 30 s", line), line

            # Shown starting, with its pid, in the registry and by the CLI (by replica id).
            entry = await registry_until(
                http,
                rid,
                lambda e: (
                    [(w["state"], w["pid"]) for w in workers_of(e, "slow_load")]
                    == [("starting", pid)]
                ),
            )
            assert "slow_load" in offered(entry)
            code, out, err = await cli(
                "workers", "list", "--replica", rid, "--api-server", cluster.url
            )
            assert code == 0, err
            assert row(out, "slow_load-0").split()[2:4] == [str(pid), "starting"]
            assert answers == []

            gate.touch()  # the model is loaded
        (answer,) = answers
        assert answer.status_code == 200, answer.text
        assert json_output(answer.json(), "text_output") == "loaded"
        entry = await registry_until(
            http, rid, lambda e: [w["state"] for w in workers_of(e, "slow_load")] == ["ready"]
        )
        assert workers_of(entry, "slow_load")[0]["restarts"] == 0
        assert not manager_lines(caplog, logging.WARNING)


async def test_a_worker_over_its_handlers_start_timeout_is_killed_restarted_then_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="anyserve.manager")
    async with (
        loading_cluster(tmp_path / "unused", monkeypatch) as cluster,
        http_to(cluster) as http,
    ):
        replica = cluster.replicas[0]
        rid, manager = replica.replica_id, manager_of(replica)
        # Failed at the second timeout instead of the fifth: a shorter test, the same accounting.
        manager.supervisor.policy = RestartPolicy(crash_limit=2)
        begun = anyio.current_time()
        code, out, err = await cli(
            "workers", "start", "stuck", "--replica", rid, "--api-server", cluster.url
        )
        took = anyio.current_time() - begun
        # Failed: out of the registration, shown failed with the reason.
        entry = await registry_until(
            http, rid, lambda e: [w["state"] for w in workers_of(e, "stuck")] == ["failed"]
        )
        assert "stuck" not in offered(entry) and "ok" in offered(entry)
        assert "did not start within 0.5 s" in workers_of(entry, "stuck")[0]["error"]

    # `stuck` declares start_timeout=0.5; the replica's own 30 s never came into it.
    within = f"did not start within {STUCK_START_TIMEOUT:g} s"
    assert took < REPLICA_TIMEOUT / 2
    assert code == 1, out
    assert err.splitlines() == [
        f"anyserve: Unavailable (503): handler stuck failed: worker stuck-0 crashed 2 times"
        f" in 60s, the last time: {within}; start it again with `anyserve workers start stuck`"
    ]
    warnings = manager_lines(caplog, logging.WARNING)
    assert warnings == [
        f"worker stuck-0 {within}; killing it",
        f"worker stuck-0 {within}; restarting in 0.1s",
        f"worker stuck-0 {within}; killing it",
    ]
    # Two processes, each logged while it loaded, both gone.
    pids = {
        int(found[1])
        for m in manager_lines(caplog)
        if (found := re.match(r"worker stuck-0 \(pid (\d+)\) still loading, ", m))
    }
    assert len(pids) == 2 and not any(pid_alive(pid) for pid in pids), pids
    (slot,) = manager.slots["stuck"]
    assert slot.restarts == 1 and within in slot.failure


@pytest.mark.parametrize(
    "command",
    [
        ("start", "--app", STUCK_APP, "--port", "0"),
        ("run", STUCK_APP, "--port", "0", "--grpc-port", "0"),
    ],
    ids=["start", "run"],
)
async def test_the_start_timeout_flag_bounds_a_worker_without_its_own(
    command: tuple[str, ...],
) -> None:
    seen: list[str] = []
    async with anyserve_process(*command, "--start-timeout", "0.5") as process:
        assert process.stderr is not None
        with anyio.fail_after(20):
            line = await read_until(
                process.stderr, "worker stuck-0 did not start within 0.5 s; killing it", seen
            )
    assert " WARNING anyserve.manager: " in line
    assert not any("Traceback" in s for s in seen), seen


@pytest.mark.parametrize(
    "command",
    [
        ("start", "--app", STUCK_APP, "--port", "0"),
        ("run", STUCK_APP, "--port", "0", "--grpc-port", "0"),
    ],
    ids=["start", "run"],
)
async def test_ctrl_c_while_a_worker_loads_stops_at_once(command: tuple[str, ...]) -> None:
    seen: list[str] = []
    async with anyserve_process(*command, "--start-timeout", str(REPLICA_TIMEOUT)) as process:
        assert process.stderr is not None
        with anyio.fail_after(20):
            await read_until(process.stderr, "worker ok-0 (pid ", seen)  # stuck-0 still loads
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(5):  # not after the 30 s start timeout
            await process.wait()
        seen.extend(b"".join([chunk async for chunk in process.stderr]).decode().splitlines())
    assert not any("Traceback" in line for line in seen), seen
