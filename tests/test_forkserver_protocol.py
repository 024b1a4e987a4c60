"""The fork server's protocol, spoken by hand to a real fork server process
(the replica's side of it, :mod:`anyserve.replica.forkclient`, is exercised
by tests/test_fork_server.py): ready, spawn with descriptors, the pidfd,
exit reports, refused requests, and its exit when its socket closes.

Blocking sockets with timeouts: every wait is bounded, none is a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from anyserve import wire
from anyserve._proto import worker_pb2 as wpb
from anyserve.replica import forkserver
from anyserve.replica.spawning import FORK_SERVER_SUPPORTED

pytestmark = pytest.mark.skipif(not FORK_SERVER_SUPPORTED, reason="fork servers need pidfds")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """A fork server process and the replica's end of its socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.settimeout(TIMEOUT)
    proc = subprocess.Popen(
        [sys.executable, "-m", forkserver.MODULE, "--fd", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
        cwd=ROOT,
    )
    theirs.close()
    try:
        yield proc, mine
    finally:
        mine.close()
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    received = forkserver.receive(sock)
    assert received is not None, "the fork server closed its end"
    return received


def spawn_request(request_id: int, handler: str = "preloaded") -> dict[str, Any]:
    args = ["--app", "tests.apps.forkserver_app:app", "--handler", handler, "--fd", "999"]
    args += ["--worker-id", f"{handler}-0", "--app-dir", str(ROOT)]
    return {"spawn": request_id, "args": args, "env": dict(os.environ), "cwd": str(ROOT)}


def read_hello(sock: socket.socket) -> wpb.Hello:
    """The worker's first frame (it must be a Hello)."""
    sock.settimeout(TIMEOUT)
    prefix = sock.recv(wire.PREFIX.size, socket.MSG_WAITALL)
    header_len, payload_len = wire.PREFIX.unpack(prefix)
    header = wpb.Header.FromString(sock.recv(header_len, socket.MSG_WAITALL))
    assert header.WhichOneof("kind") == "hello" and payload_len == 0
    return header.hello


def spawn(ctl: socket.socket, request_id: int) -> tuple[int, int, socket.socket]:
    """Ask for a worker; its pid, pidfd and the dispatcher's end of its socket."""
    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    forkserver.send(ctl, spawn_request(request_id), [its.fileno(), 0, 1, 2])
    its.close()  # the fork server holds its own copy until it has forked
    reply, fds = receive(ctl)
    assert reply == {"spawned": request_id, "pid": reply["pid"]} and len(fds) == 1, reply
    return reply["pid"], fds[0], ours


def test_ready_spawn_hello_exit_and_the_end(
    server: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    proc, ctl = server
    assert receive(ctl) == ({"ready": proc.pid}, [])
    pid, pidfd, ours = spawn(ctl, 1)
    hello = read_hello(ours)
    assert hello.pid == pid and hello.handler == "preloaded" and hello.worker_id == "preloaded-0"
    # Closing the dispatcher's end ends the worker; the fork server reaps it and says so.
    ours.close()
    assert receive(ctl) == ({"exited": pid, "code": 0}, [])
    os.close(pidfd)
    # A worker killed through its pidfd: the signal is in its exit code.
    pid, pidfd, ours = spawn(ctl, 2)
    read_hello(ours)
    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    assert receive(ctl) == ({"exited": pid, "code": -signal.SIGKILL}, [])
    os.close(pidfd)
    ours.close()
    # The replica's end closing ends the fork server.
    ctl.close()
    assert proc.wait(timeout=TIMEOUT) == 0


def test_malformed_requests_are_refused_and_their_descriptors_closed(
    server: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    _, ctl = server
    receive(ctl)  # ready
    ours, its = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bad = {
        "one descriptor": (spawn_request(1), [its.fileno()]),
        "no --fd": ({**spawn_request(2), "args": ["--app", "x:app"]}, [its.fileno(), 0, 1, 2]),
        "env not strings": ({**spawn_request(3), "env": {"A": 1}}, [its.fileno(), 0, 1, 2]),
    }
    for request, fds in bad.values():
        forkserver.send(ctl, request, fds)
        reply, got = receive(ctl)
        assert reply["failed"] == request["spawn"] and reply["error"] and got == [], reply
    ctl.send(b"not json")
    reply, _ = receive(ctl)
    assert reply["failed"] is None and "bad request" in reply["error"]
    # The fork server kept no copy of the socket: once ours is the only end
    # left open besides `its`, closing `its` makes ours see the end.
    its.close()
    ours.settimeout(TIMEOUT)
    assert ours.recv(1) == b""
    ours.close()
