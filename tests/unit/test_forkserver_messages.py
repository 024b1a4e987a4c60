"""The fork server's messages and the spawner's choices, without a fork
server process (the real one: tests/test_forkserver_protocol.py and
tests/test_fork_server.py).

* a message and its descriptors cross a SOCK_SEQPACKET socket as one record;
  a malformed one is refused with its descriptors closed;
* a forked process that has exited cannot be signalled any more (its pidfd
  is closed, so no signal can reach a process that reused its pid);
* the spawner asks the fork server only for the worker module's command, and
  starts the worker as a new interpreter when the fork server fails, on a
  new socketpair (the old one is closed: an unreported fork may hold it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping

import anyio
import pytest

from anyserve.replica import forkserver, spawning
from anyserve.replica.forkclient import ForkedProcess, ForkServer, ForkServerError
from anyserve.replica.spawning import Spawner, WorkerProcess

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not spawning.FORK_SERVER_SUPPORTED, reason="needs pidfds"),
]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_numbers() -> set[str]:
    # By number: none a test opened is left, while an earlier test's socket
    # the garbage collector closes meanwhile does not count.
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


def test_a_message_and_its_descriptors_arrive_together(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    read, write = os.pipe()
    try:
        forkserver.send(a, {"spawn": 1, "args": ["x"]}, [write])
        message, fds = forkserver.receive(b) or ({}, [])
        assert message == {"spawn": 1, "args": ["x"]} and len(fds) == 1
        os.write(fds[0], b"through the copy")
        os.close(fds[0])
        assert os.read(read, 100) == b"through the copy"
    finally:
        os.close(read)
        os.close(write)
    a.close()
    assert forkserver.receive(b) is None  # the peer closed its end


@pytest.mark.parametrize("data", [b"not json", b"[1, 2]"])
def test_a_malformed_message_is_refused_with_its_descriptors_closed(
    pair: tuple[socket.socket, socket.socket], data: bytes
) -> None:
    a, b = pair
    before = open_fds()
    socket.send_fds(a, [data], [0, 1])
    with pytest.raises(ValueError):
        forkserver.receive(b)
    assert open_fds() == before


async def test_an_exited_forked_process_cannot_be_signalled() -> None:
    # A pidfd of this very process stands in for a child's.
    proc = ForkedProcess(os.getpid(), os.pidfd_open(os.getpid()))
    before = open_fds()
    proc.exited(-9)
    assert open_fds() == before - 1  # its pidfd is closed at once
    assert await proc.wait() == -9 and proc.returncode == -9
    for send in (proc.terminate, proc.kill):
        with pytest.raises(ProcessLookupError):
            send()


def sleeper() -> subprocess.Popen[bytes]:
    """A child of this process that waits to be killed. Not an asyncio one: no
    child watcher may reap it behind the test's back."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def gone(pid: int) -> bool:
    """No process ``pid``, not even a zombie."""
    return not os.path.exists(f"/proc/{pid}")


async def test_an_orphan_that_became_this_processs_child_is_reaped_with_its_code() -> None:
    # What happens to a forked worker whose fork server died while the replica
    # is PID 1 (a container): it is reparented to the replica. A child of this
    # process stands in for it.
    child = sleeper()
    try:
        proc = ForkedProcess(child.pid, os.pidfd_open(child.pid))
        proc.orphaned()
        proc.kill()
        with anyio.fail_after(10):
            assert await proc.wait() == -signal.SIGKILL
        assert gone(child.pid)  # reaped here: no zombie left
    finally:
        if child.returncode is None:
            child.kill()
        with contextlib.suppress(ChildProcessError):
            child.wait()


class FailingServer(ForkServer):
    """A fork server that refuses every spawn."""

    def __init__(self) -> None:
        super().__init__(python="python")
        self.pid = 4242
        self.asked: list[list[str]] = []

    async def spawn(
        self, args: list[str], env: Mapping[str, str], sock: socket.socket
    ) -> ForkedProcess:
        self.asked.append(args)
        raise ForkServerError("out of forks")


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replaces spawn_interpreter: records each command it would run."""
    started: list[list[str]] = []

    async def fake(
        command: spawning.Command, env: Mapping[str, str]
    ) -> tuple[WorkerProcess, socket.socket]:
        started.append(command(7))
        raise OSError("not really")

    monkeypatch.setattr(spawning, "spawn_interpreter", fake)
    return started


def running(spawner: Spawner, server: ForkServer) -> Spawner:
    """``spawner`` as its run() leaves it once ``server`` is ready."""
    spawner._running = True
    spawner.current = server
    spawner._settled.set()
    return spawner


async def test_a_refused_spawn_falls_back_to_a_new_interpreter_and_says_so(
    interpreter: list[list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "anyserve.manager")
    server = FailingServer()
    spawner = running(Spawner("py", fork_server=True), server)
    before = fd_numbers()

    def command(fd: int) -> list[str]:
        return ["py", "-m", forkserver.WORKER_MODULE, "--fd", str(fd)]

    with pytest.raises(OSError, match="not really"):
        await spawner.spawn(command, {}, "chat-0")
    assert server.asked and server.asked[0][:1] == ["--fd"]
    assert interpreter == [["py", "-m", forkserver.WORKER_MODULE, "--fd", "7"]]
    assert fd_numbers() <= before  # the socketpair the fork server was offered is closed
    assert "fork server (pid 4242) could not start worker chat-0 (out of forks)" in caplog.text


async def test_only_the_worker_modules_command_is_forked(interpreter: list[list[str]]) -> None:
    server = FailingServer()
    spawner = running(Spawner("py", fork_server=True), server)
    for other in (["/other/python", "-m", forkserver.WORKER_MODULE], ["py", "-c", "pass"]):

        def command(fd: int, other: list[str] = other) -> list[str]:
            return [*other, "--fd", str(fd)]

        with pytest.raises(OSError):
            await spawner.spawn(command, {}, "w-0")
    assert server.asked == [] and len(interpreter) == 2


async def test_without_a_fork_server_run_returns_and_spawns_are_new_interpreters(
    interpreter: list[list[str]],
) -> None:
    spawner = Spawner("py", fork_server=False)
    await spawner.run()
    assert spawner.current is None
    with pytest.raises(OSError):
        await spawner.spawn(lambda fd: ["py", "-m", forkserver.WORKER_MODULE], {}, "w-0")
    assert len(interpreter) == 1
