"""Worker lifecycle hardening, end to end: real API server, replicas and
worker processes on loopback (tests/apps/recycle_app.py misbehaves on purpose).

* a sync handler still running past its deadline + ``stuck_call_grace`` gets
  its worker drained and replaced (recycled, not a crash), shown in /registry;
* a worker over its ``max_memory_mib`` is recycled while requests keep
  succeeding on the handler's other worker;
* a worker that cuts its connection but lingers fails its in-flight call at
  once, not after the reap;
* a worker process that cannot even be spawned leaks no socket and leaves the
  other handlers serving;
* cancelling a replica while its workers load ends it promptly.

The grace, the watch period and the timeouts are short here; every wait is
polled with a deadline.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import anyio
import pytest

import anyserve.replica.processes as processes
from anyserve.replica.server import Replica, ReplicaConfig
from anyserve.replica.slot import Slot, State
from anyserve.replica.supervisor import RestartPolicy
from tests.support import eventually
from tests.test_workers import (
    body,
    cli,
    cluster_of,
    http_to,
    json_output,
    manager_of,
    pid_alive,
    registry_until,
    workers_of,
)
from tests.test_workers import row as listed

pytestmark = pytest.mark.anyio

APP = "tests.apps.recycle_app:app"
STUCK_APP = "tests.apps.workers_stuck_app:app"
# Seconds a cancelled call may run on here, and between the replica's checks.
GRACE = 0.3
WATCH = 0.05
FAST = {"stuck_call_grace": GRACE, "watch_interval": WATCH}


def pid_of(answer: Any) -> int:
    assert answer.status_code == 200, answer.text
    return int(json_output(answer.json(), "text_output"))


async def test_a_call_stuck_past_its_deadline_gets_its_worker_recycled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="anyserve.manager")
    async with cluster_of(APP, **FAST) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        (slot,) = manager_of(replica).slots["hang"]
        headers = {"X-Capability-Type": "hang"}
        first = pid_of(await http.post("/infer", headers=headers, json=body()))

        # Two calls that ignore their cancellation: their clients get 504 at the deadline.
        hung: list[int] = []

        async def hang() -> None:
            answer = await http.post(
                "/infer", headers={**headers, "X-Request-Timeout": "0.5"}, json=body("hang")
            )
            hung.append(answer.status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            tg.start_soon(hang)
        assert hung == [504, 504]

        # The worker takes no new calls, is replaced, and that is no crash.
        entry = await registry_until(
            http,
            replica.replica_id,
            lambda e: (
                workers_of(e, "hang")[0]["recycles"] >= 1
                and workers_of(e, "hang")[0]["pid"] not in (None, first)
            ),
            timeout=10,
        )
        (row,) = workers_of(entry, "hang")
        assert "still running" in row["last_recycle"] and "handler hang" in row["last_recycle"]
        assert row["restarts"] == 0 and row["error"] is None
        assert slot.restarts == 0
        await eventually(lambda: not pid_alive(first), timeout=5)
        second = pid_of(await http.post("/infer", headers=headers, json=body()))
        assert second != first
        code, out, err = await cli("workers", "list", "--replica", replica.endpoint)
        assert code == 0, err
        cells = listed(out, "hang-0").split()
        assert cells[3:7] == ["ready", "0", "0", "1"], out  # state, inflight, restarts, recycles
        line = listed(out, "hang-0")
        assert "last recycled:" in line and "still running" in line
        lines = [r.getMessage() for r in caplog.records if r.name == "anyserve.manager"]
        assert any(
            f"recycling worker hang-0 (pid {first})" in line and "still running" in line
            for line in lines
        ), lines


async def test_a_worker_over_its_memory_limit_is_recycled_without_failing_requests(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="anyserve.manager")
    # The handler's own max_memory_mib (read when the app is imported): a worker
    # starts under 100 MiB and the handler keeps 8 MiB more per call.
    monkeypatch.setenv("LEAK_LIMIT", "100")
    async with cluster_of(APP, **FAST) as cluster, http_to(cluster) as http:
        replica = cluster.replicas[0]
        slots = manager_of(replica).slots["leak"]
        assert [s.handler.max_memory_mib for s in slots] == [100.0, 100.0]
        first = {s.pid for s in slots}
        headers = {"X-Capability-Type": "leak"}
        served: set[int] = set()
        for _ in range(60):
            served.add(pid_of(await http.post("/infer", headers=headers, json=body())))
            if sum(s.recycles for s in slots) and served - first:
                break
        else:
            pytest.fail(f"no worker recycled: {[(s.id, s.pid, s.recycles) for s in slots]}")
        entry = await registry_until(
            http,
            replica.replica_id,
            lambda e: any(w["recycles"] for w in workers_of(e, "leak")),
        )
        reasons = [w["last_recycle"] for w in workers_of(entry, "leak") if w["recycles"]]
        assert "over the limit of 100 MiB" in reasons[0], reasons
        assert all(w["restarts"] == 0 for w in workers_of(entry, "leak"))
        assert any("resident memory" in r.getMessage() for r in caplog.records)


async def test_a_worker_that_closes_its_connection_and_lingers_fails_its_call_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lingering process is terminated sooner than its 5 s so the test ends sooner.
    monkeypatch.setattr(processes, "REAP_GRACE", 0.5)
    async with cluster_of(APP) as cluster, http_to(cluster) as http:
        started = time.monotonic()
        answer = await http.post("/infer", headers={"X-Capability-Type": "linger"}, json=body())
        took = time.monotonic() - started
        assert answer.status_code == 503, answer.text
        assert "worker linger-0" in answer.text
        # Not after the reap's grace (5 s) and the SIGTERM.
        assert took < 2.0, took


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_worker_that_cannot_be_spawned_leaks_nothing_and_others_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = processes.worker_command

    def broken_for_hang(config: processes.WorkerConfig, slot: Slot, fd: int) -> list[str]:
        cmd = real(config, slot, fd)
        if slot.handler.name == "hang":
            cmd[0] = "/nonexistent/python3"
        return cmd

    monkeypatch.setattr(processes, "worker_command", broken_for_hang)
    async with cluster_of(APP) as cluster, http_to(cluster) as http:
        manager = manager_of(cluster.replicas[0])
        manager.supervisor.policy = RestartPolicy(backoff_start=0.01, backoff_max=0.02)
        (slot,) = manager.slots["hang"]
        await eventually(lambda: slot.state is State.FAILED, timeout=10)
        assert "could not be started" in slot.failure and "/nonexistent/python3" in slot.failure
        before = open_fds()
        for _ in range(4):
            manager.start_handler("hang")
            await eventually(lambda: slot.state is State.FAILED, timeout=10)
        # Twenty more failed spawns, and not one socket left behind.
        assert open_fds() <= before + 2, (before, open_fds())
        answer = await http.post("/infer", headers={"X-Capability-Type": "ok"}, json=body())
        assert pid_of(answer) == manager.slots["ok"][0].pid
        refused = await http.post("/infer", headers={"X-Capability-Type": "hang"}, json=body())
        assert refused.status_code == 503, refused.text
        entry = await registry_until(
            http, cluster.replicas[0].replica_id, lambda e: bool(workers_of(e, "hang"))
        )
        assert "could not be started" in workers_of(entry, "hang")[0]["error"]


async def test_cancelling_a_replica_while_its_workers_load_ends_it_promptly() -> None:
    replica = Replica(ReplicaConfig(app=STUCK_APP, port=0, grace=1.0))
    pids: list[int] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(replica.run)
        # Its `stuck` worker never finishes importing (it sleeps an hour).
        await eventually(lambda: _pid(replica, "stuck") is not None, timeout=20)
        pids = [pid for pid in (_pid(replica, "stuck"), _pid(replica, "ok")) if pid]
        started = time.monotonic()
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 3.0
    assert pids and not any(pid_alive(pid) for pid in pids)


def _pid(replica: Replica, handler: str) -> int | None:
    try:
        slots = replica.manager.slots[handler]
    except RuntimeError:  # startup() has not run yet
        return None
    return slots[0].pid if slots else None
