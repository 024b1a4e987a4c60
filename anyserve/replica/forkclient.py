"""The replica's side of one fork server (:mod:`anyserve.replica.forkserver`):
starting it, asking it for workers, and the processes it forked.

:class:`ForkServer` starts the process, sends spawn requests and, in
:meth:`ForkServer.serve`, reads what the fork server says: the pid and pidfd
of each worker it forked, and each worker's exit code once it has reaped it.
:class:`ForkedProcess` is such a worker as the replica sees it (a
:class:`~anyserve.replica.spawning.WorkerProcess`): signalled through its
pidfd, its ``wait`` answered by the fork server's exit report. When the fork
server has ended its workers are *orphaned*: they keep running, and their
end is seen when their pidfd turns readable, with no exit code unless
they were reparented to this process (PID 1 in a container): then it reaps
them, exit code included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import anyio

from anyserve.replica import forkserver

log = logging.getLogger("anyserve.manager")

#: Seconds a fork server may take to answer a spawn request (a fork takes milliseconds).
SPAWN_TIMEOUT = 10.0
#: Seconds a fork server gets to exit once its socket is closed, before SIGKILL.
EXIT_GRACE = 5.0


class ForkServerError(Exception):
    """The fork server could not start a worker, or is not running."""


class ForkedProcess:
    """A worker forked by a fork server: a
    :class:`~anyserve.replica.spawning.WorkerProcess` (which says what each
    member guarantees), told of its end by :meth:`exited` or, once orphaned,
    by its pidfd."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self._pid = pid
        self._pidfd: int | None = pidfd
        self._returncode: int | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self._returncode

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self._pidfd is None:
            raise ProcessLookupError(f"process {self._pid} has exited")
        signal.pidfd_send_signal(self._pidfd, signum)

    def exited(self, code: int | None) -> None:
        """It has exited with ``code`` (None: unknown)."""
        if self._pidfd is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._returncode = code
        self._exited.set()

    def orphaned(self) -> None:
        """Its fork server is gone (its exit code with it): it has exited
        when its pidfd turns readable."""
        if self._pidfd is not None:
            asyncio.get_running_loop().add_reader(self._pidfd, self._orphan_exited)

    def _orphan_exited(self) -> None:
        # An orphan is reparented to the nearest subreaper, else PID 1, which
        # is this replica in a container started as `anyserve start`: then it
        # is this process's child now, and must be reaped here (its exit code
        # comes with it). Anyone else's child: its exit code is not ours to know.
        code = None
        try:
            assert self._pidfd is not None
            found = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        except OSError:
            found = None
        if found is not None:
            status = found.si_status
            code = status if found.si_code == os.CLD_EXITED else -status
        self.exited(code)


class ForkServer:
    """One fork server process and the replica's end of its socket (see
    :mod:`anyserve.replica.forkserver` for the protocol)."""

    def __init__(self, python: str) -> None:
        self.python = python
        self.pid = 0
        self.lost = False
        self._process: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._requests: dict[int, asyncio.Future[ForkedProcess]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self._next_id = 0

    async def start(self, timeout: float) -> None:
        """Start the process and wait until it is ready. Raises ForkServerError
        (nothing left running) when it cannot start or is not ready in time."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        mine.setblocking(False)
        self._sock = mine
        try:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *(self.python, "-m", forkserver.MODULE, "--fd", str(theirs.fileno())),
                    pass_fds=(theirs.fileno(),),
                    stdin=asyncio.subprocess.DEVNULL,
                )
            finally:
                theirs.close()
            with anyio.fail_after(timeout):
                received = await self._receive()
            if received is None:
                code = await self._process.wait()
                raise ForkServerError(f"it exited (code {code}) before it was ready")
            message, fds = received
            forkserver.close_all(fds)
            if "ready" not in message:
                raise ForkServerError(str(message.get("error", message)))
            self.pid = self._process.pid
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.aclose()
            if isinstance(exc, OSError | ValueError | TimeoutError):
                reason = "not ready in time" if isinstance(exc, TimeoutError) else exc
                raise ForkServerError(str(reason)) from exc
            raise

    async def serve(self) -> None:
        """Read the fork server's messages until it closes its end (it ended);
        then it is :attr:`lost`: its requests fail and its workers are orphaned."""
        try:
            while True:
                try:
                    received = await self._receive()
                except ValueError as exc:
                    log.warning("fork server (pid %d) sent a bad message: %s", self.pid, exc)
                    continue
                except OSError as exc:
                    log.warning("fork server (pid %d): cannot read its socket: %s", self.pid, exc)
                    return
                if received is None:
                    return
                self._dispatch(*received)
        finally:
            self._lose()

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        if "spawned" in message and len(fds) == 1:
            os.set_inheritable(fds[0], False)  # received descriptors are inheritable
            child = ForkedProcess(int(message["pid"]), fds[0])
            self._children[child.pid] = child
            waiting = self._requests.pop(message["spawned"], None)
            if waiting is None or waiting.done():
                child.kill()  # its spawn was given up: nobody would ever stop it
            else:
                waiting.set_result(child)
            return
        forkserver.close_all(fds)
        if "failed" in message:
            waiting = self._requests.pop(message["failed"], None)
            if waiting is not None and not waiting.done():
                waiting.set_exception(ForkServerError(str(message.get("error"))))
        elif "exited" in message:
            exited = self._children.pop(int(message["exited"]), None)
            if exited is not None:
                exited.exited(int(message["code"]))

    def _lose(self) -> None:
        self.lost = True
        for waiting in self._requests.values():
            if not waiting.done():
                waiting.set_exception(ForkServerError("the fork server has ended"))
        self._requests.clear()
        for child in self._children.values():
            child.orphaned()
        self._children.clear()

    async def spawn(
        self, args: list[str], env: Mapping[str, str], sock: socket.socket
    ) -> ForkedProcess:
        """Fork a worker with ``args`` (the worker module's options), ``env``
        and ``sock`` (its end of its socketpair; this process keeps its own
        copy) and this process's stdio. Returns a :class:`ForkedProcess`;
        raises ForkServerError when the fork server does not start it."""
        if self.lost or self._sock is None:
            raise ForkServerError("the fork server has ended")
        self._next_id += 1
        request_id = self._next_id
        waiting: asyncio.Future[ForkedProcess] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = waiting
        stdio, opened = _stdio()
        try:
            cwd: str | None = os.getcwd()
        except OSError:
            cwd = None  # it was removed: the worker keeps the fork server's
        message = {"spawn": request_id, "args": args, "env": dict(env), "cwd": cwd}
        try:
            await self._send(message, [sock.fileno(), *stdio])
            with anyio.fail_after(SPAWN_TIMEOUT):
                return await waiting
        except OSError as exc:
            raise ForkServerError(f"cannot send it the request: {exc}") from exc
        except TimeoutError:
            raise ForkServerError(f"no answer within {SPAWN_TIMEOUT:g} s") from None
        finally:
            self._requests.pop(request_id, None)
            forkserver.close_all(opened)

    async def aclose(self) -> int | None:
        """Close the socket (the fork server exits), wait for the process
        (SIGKILL after EXIT_GRACE) and return its exit code (None: it never
        started)."""
        if self._sock is not None:
            self._sock.close()
        self._lose()
        process = self._process
        if process is None:
            return None
        with anyio.move_on_after(EXIT_GRACE):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        return process.returncode

    async def _receive(self) -> tuple[dict[str, Any], list[int]] | None:
        assert self._sock is not None
        while True:
            try:
                return forkserver.receive(self._sock)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)

    async def _send(self, message: dict[str, Any], fds: list[int]) -> None:
        assert self._sock is not None
        while True:
            try:
                return forkserver.send(self._sock, message, fds)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)


def _stdio() -> tuple[list[int], list[int]]:
    """This process's stdin, stdout and stderr descriptors for a worker (what a
    spawned child inherits), and those opened here for closed ones (/dev/null)."""
    fds, opened = [], []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR)
            opened.append(fd)
        fds.append(fd)
    return fds, opened
