"""The fork server end to end (real replicas, fork servers and workers;
tests/apps/forkserver_app.py reports what a worker sees of its process).

* workers are forked by the replica's fork server, serve calls, and get
  ``ANYSERVE_HANDLER`` before the app's import;
* a forked worker sees the same process as one started as a new interpreter
  (``fork_server=False``): environment at the time of the spawn, directory,
  command line, ``sys.path``, descriptors, signals, process group;
* its output reaches the replica's stdout and stderr; its exit codes reach
  the calls it fails, as before;
* a fork server killed with SIGKILL is replaced (and logged), its workers
  keep serving and can still be stopped;
* a fork server that cannot start leaves the workers to start as new interpreters;
* a replica killed with SIGKILL leaves neither its fork server nor its
  workers behind.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from anyserve import codec
from anyserve.objects.peers import OBJECT_SOURCE_ENV
from anyserve.proto import ModelInferRequest
from anyserve.replica import forkserver
from anyserve.replica.server import Replica
from anyserve.replica.spawning import FORK_SERVER_SUPPORTED
from anyserve.testing import GrpcClient, start_replica
from tests.support import eventually, free_port
from tests.test_replica_process import alive, wait_serving

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not FORK_SERVER_SUPPORTED, reason="fork servers need Linux pidfds"),
]

APP = "tests.apps.forkserver_app:app"
ROOT = Path(__file__).resolve().parent.parent


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (from /proc; its name may hold spaces)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def children_of(pid: int) -> list[tuple[int, str]]:
    """The live children of ``pid``: (pid, command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent_of(int(entry.name)) != pid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile
        found.append((int(entry.name), cmdline))
    return found


async def ask(client: GrpcClient, kind: str) -> Any:
    """Call the handler of type ``kind``; its answer, decoded from JSON when it is."""
    response = await client.infer(ModelInferRequest(id=kind), capability={"type": kind})
    text = codec.decode_outputs(response)["text_output"].decode()
    return json.loads(text) if text.startswith("{") else text


def comm_of(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def fork_server_pid(replica: Replica) -> int:
    server = replica.manager.spawner.current
    assert server is not None, "no fork server is running"
    return server.pid


async def test_workers_are_forked_by_the_fork_server_and_serve() -> None:
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        server = fork_server_pid(replica)
        preloaded = await ask(client, "facts")
        lazy = await ask(client, "lazy")  # started on demand by this call
    assert preloaded["ppid"] == server and lazy["ppid"] == server
    assert preloaded["pid"] != lazy["pid"]
    # Set before the app's import, which happens in the child after the fork.
    assert preloaded["handler_at_import"] == "preloaded"
    assert lazy["handler_at_import"] == "lazy"
    assert not alive(server)  # the replica's end closed: it exited and was reaped


async def test_each_worker_process_is_named_after_its_worker_id() -> None:
    """A forked worker's command line is its fork server's: ps and top tell
    workers apart by the name each gives its process."""
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        await ask(client, "facts")
        named = {slot.id: comm_of(slot.pid) for slot in replica.manager.all_slots() if slot.pid}
    assert named and all(comm == worker_id[:15] for worker_id, comm in named.items())


async def test_a_forked_worker_sees_what_a_new_interpreter_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[bool, dict[str, Any]] = {}
    for fork in (True, False):
        async with start_replica(APP, fork_server=fork, replica_id="same") as replica:
            assert (replica.manager.spawner.current is not None) is fork
            # Set after the fork server started: a worker gets the environment
            # of the moment it is spawned.
            monkeypatch.setenv("FORK_SERVER_TEST", f"fork={fork}")
            async with GrpcClient(replica.endpoint) as client:
                seen[fork] = await ask(client, "lazy")
            if fork:
                assert seen[fork]["ppid"] == fork_server_pid(replica)
            else:
                assert seen[fork]["ppid"] == os.getpid()
    forked, spawned = seen[True], seen[False]
    assert forked["env"]["FORK_SERVER_TEST"] == "fork=True"
    for env in (forked["env"], spawned["env"]):
        del env["FORK_SERVER_TEST"], env[OBJECT_SOURCE_ENV]  # the replica's port differs
    for fact in ("env", "cwd", "argv", "path", "descriptors", "signals", "blocked", "pgid", "sid"):
        assert forked[fact] == spawned[fact], fact
    assert forked["pgid"] == os.getpgid(0)  # the replica's group, as before (Ctrl-C reaches it)
    # None of the fork server's (its socket to the replica, its pidfds, its epoll).
    assert "anon_inode:[pidfd]" not in forked["descriptors"]
    assert forked["descriptors"].count("anon_inode:[eventpoll]") == 1  # the worker's own loop


async def test_a_forked_workers_output_goes_to_the_replicas_stdout_and_stderr(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        assert await ask(client, "shout") == "said"
        out, err = capfd.readouterr()
    assert "worker stdout line" in out
    assert "worker stderr line" in err


async def test_exit_codes_of_forked_workers_reach_their_calls() -> None:
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        for kind, ended in (
            ("killed", "was killed by SIGKILL (exit code -9)"),
            ("exits", "exited with code 7"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await ask(client, kind)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"worker {kind}-0 (pid " in str(failed.value.details())
            assert ended in str(failed.value.details())


async def test_a_fork_server_killed_is_replaced_and_its_workers_keep_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "anyserve.manager")
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        manager = replica.manager
        first = fork_server_pid(replica)
        before = await ask(client, "facts")
        os.kill(first, signal.SIGKILL)

        def replaced() -> bool:
            server = manager.spawner.current
            return server is not None and server.pid != first

        await eventually(replaced, timeout=30)
        second = fork_server_pid(replica)
        assert f"fork server (pid {first}) was killed by SIGKILL (exit code -9)" in caplog.text
        assert f"fork server (pid {second}) ready" in caplog.text
        # Its orphaned worker still serves, and a new one is the new server's fork.
        assert (await ask(client, "facts"))["pid"] == before["pid"]
        assert (await ask(client, "lazy"))["ppid"] == second
        # The orphan can still be stopped; its end is seen through its pidfd.
        slot = await manager.stop_worker("preloaded-0")
        assert slot.pid is None
        await eventually(lambda: not alive(before["pid"]), timeout=5)


async def test_a_fork_server_that_cannot_start_leaves_workers_to_new_interpreters(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(forkserver, "MODULE", "anyserve.replica.no_such_module")
    async with start_replica(APP) as replica, GrpcClient(replica.endpoint) as client:
        assert (await ask(client, "lazy"))["ppid"] == os.getpid()
        assert replica.manager.spawner.current is None
    assert "the fork server could not start" in caplog.text


@pytest.fixture
def replica_process() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "anyserve.cli", "start", "--app", APP, "--port", str(port)],
        cwd=ROOT,
        start_new_session=True,  # one killpg below cleans up whatever a failure leaves
    )
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_kill_9_of_the_replica_leaves_no_fork_server_or_worker_behind(
    replica_process: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, endpoint = replica_process
    (preloaded,) = await wait_serving(endpoint)
    async with GrpcClient(endpoint) as client:
        lazy = (await ask(client, "lazy"))["pid"]
    servers = [pid for pid, cmd in children_of(proc.pid) if forkserver.MODULE in cmd]
    assert len(servers) == 1, children_of(proc.pid)
    assert parent_of(preloaded) == servers[0] == parent_of(lazy)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [servers[0], preloaded, lazy]
    await eventually(lambda: not any(alive(pid) for pid in left), timeout=10, what="all gone")
