"""Starting worker processes: forked by the replica's fork server, or as new
interpreters.

:class:`Spawner` is the one way the replica starts a worker. With the fork
server on (``ReplicaConfig.fork_server``, the default on Linux; ``anyserve
start --no-fork-server`` turns it off) it keeps one
:mod:`~anyserve.replica.forkserver` process running and asks it to fork each
worker; otherwise, and whenever the fork server cannot (it is not running yet
or any more, it failed, the command is not the worker module's), the worker
starts as a new interpreter (``asyncio.create_subprocess_exec``) and the log
says why. Either way the caller gets a :class:`WorkerProcess` and the
replica's end of the worker's socketpair, and cannot tell them apart.

A forked worker is the fork server's child, not the replica's: its exit code
comes from the fork server (which reaps it), and it is signalled through a
pidfd (so a signal can never reach another process that got its pid). When
the fork server dies its workers keep serving; their ends are then seen
through their pidfds, with no exit code (``returncode`` None) unless they were
reparented to the replica (PID 1 in a container), which then reaps them, and a new fork
server starts after a backoff (:class:`~anyserve.replica.supervisor.CrashHistory`:
0.1 s doubling to 5 s; five deaths within 60 s and workers start as new
interpreters from then on).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import anyio
import anyio.abc

from anyserve.replica import forkserver
from anyserve.replica.forkclient import ForkServer, ForkServerError
from anyserve.replica.supervisor import CrashHistory, RestartPolicy
from anyserve.replica.worker import EXIT_BAD_APP

log = logging.getLogger("anyserve.manager")

#: Whether this system can run a fork server (pidfds: Linux >= 5.3, checked
#: again when one starts).
FORK_SERVER_SUPPORTED = sys.platform == "linux" and hasattr(os, "pidfd_open")
#: Seconds a fork server may take to import the worker machinery and say ready.
FORK_SERVER_START_TIMEOUT = 30.0

#: Builds a worker's command line given the descriptor number of its socket.
Command = Callable[[int], list[str]]


class WorkerProcess(Protocol):
    """What the replica uses of a worker process, however it was started
    (``asyncio.subprocess.Process`` is one)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has exited (negative: killed by that signal),
        None before, or when its exit code was lost."""

    async def wait(self) -> int | None:
        """Wait until it has exited; its ``returncode``."""

    def terminate(self) -> None:
        """SIGTERM; raises ProcessLookupError once it has exited."""

    def kill(self) -> None:
        """SIGKILL; raises ProcessLookupError once it has exited."""


def exit_text(code: int | None, *, started: bool = True) -> str:
    """How a worker process ended, for operators (``was killed by SIGKILL ...``).

    Code 3 means "could not import the app" only for a worker that never said
    hello (``started`` False): after start-up it is whatever the handler's
    code made of it."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    if code == EXIT_BAD_APP and not started:
        return f"exited with code {code} (could not import the app or find its handler)"
    return f"exited with code {code}"


async def spawn_interpreter(
    command: Command, env: Mapping[str, str]
) -> tuple[WorkerProcess, socket.socket]:
    """Start a worker as a new interpreter on a new socketpair; return it and
    the replica's end. Raises OSError (no socket left open) when it cannot."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *command(child.fileno()), pass_fds=(child.fileno(),), env=dict(env)
            )
        finally:
            child.close()
    except BaseException:
        parent.close()
        raise
    return proc, parent


class Spawner:
    """Starts a replica's workers (see the module docstring).

    With ``fork_server``, :meth:`run` must be running (``await tg.start(spawner.run)``)
    for workers to be forked, and must outlive every worker it forked: their
    exits are reported through it. It ends only by :meth:`close`, never by
    cancellation.
    """

    def __init__(
        self,
        python: str = sys.executable,
        *,
        fork_server: bool = False,
        start_timeout: float = FORK_SERVER_START_TIMEOUT,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.python = python
        self.fork_server = fork_server and FORK_SERVER_SUPPORTED
        self.start_timeout = start_timeout
        self.policy = policy or RestartPolicy()
        #: The running fork server, None while there is none.
        self.current: ForkServer | None = None
        # Set once the first fork server is ready, or there will be none: early
        # spawns wait for it rather than pay for a new interpreter.
        self._settled = asyncio.Event()
        self._running = False
        self._scope: anyio.CancelScope | None = None
        self._closed = False

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a fork server running until :meth:`close`: start one, and a new
        one (after a backoff) whenever it dies, each logged; give up after a
        crash loop or when one cannot start. Does nothing without ``fork_server``."""
        task_status.started()
        if not self.fork_server or self._closed:
            self._settled.set()
            return
        self._running = True
        history = CrashHistory(self.policy)
        server: ForkServer | None = None
        # Shielded: the workers' exits arrive through the fork server, and the
        # manager still waits for them while it is being cancelled.
        with anyio.CancelScope(shield=True) as self._scope:
            try:
                while True:
                    server = ForkServer(self.python)
                    try:
                        await server.start(self.start_timeout)
                    except ForkServerError as exc:
                        log.warning(
                            "the fork server could not start (%s); workers start as new"
                            " interpreters",
                            exc,
                        )
                        return
                    log.info("fork server (pid %d) ready; workers start as its forks", server.pid)
                    self.current = server
                    self._settled.set()
                    began = time.monotonic()
                    await server.serve()
                    self.current = None
                    ended = exit_text(await server.aclose())
                    delay = history.crashed(began, time.monotonic())
                    if delay is None:
                        log.error(
                            "fork server (pid %d) %s, the %dth time in %.0f s; workers start"
                            " as new interpreters from now on",
                            server.pid,
                            ended,
                            len(history.recent),
                            self.policy.crash_window,
                        )
                        return
                    log.warning(
                        "fork server (pid %d) %s; its workers keep running, new ones start as"
                        " new interpreters until a new fork server is ready (in %.1f s)",
                        server.pid,
                        ended,
                        delay,
                    )
                    await anyio.sleep(delay)
            finally:
                self.current = None
                self._running = False
                self._settled.set()
                if server is not None:
                    with anyio.CancelScope(shield=True):
                        await server.aclose()

    def close(self) -> None:
        """End :meth:`run`: its fork server exits (call it once every worker
        it forked has been reaped)."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    async def spawn(
        self, command: Command, env: Mapping[str, str], worker_id: str
    ) -> tuple[WorkerProcess, socket.socket]:
        """Start worker ``worker_id`` running ``command`` (given its socket's
        descriptor number) with environment ``env``, forked when the fork
        server can, else as a new interpreter. Returns the process and the
        replica's end of its socketpair; raises OSError (no socket left open,
        no process left running) when it cannot be started at all."""
        server = await self.ready()
        if server is not None:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                cmd = command(child.fileno())
                if cmd[:3] == [self.python, "-m", forkserver.WORKER_MODULE]:
                    proc = await server.spawn(cmd[3:], env, child)
                    child.close()
                    return proc, parent
            except ForkServerError as exc:
                log.warning(
                    "fork server (pid %d) could not start worker %s (%s); starting it as a"
                    " new interpreter",
                    server.pid,
                    worker_id,
                    exc,
                )
            except BaseException:
                parent.close()
                raise
            finally:
                child.close()
            # Never on this socketpair: a fork that was not reported may hold it.
            parent.close()
        return await spawn_interpreter(command, env)

    async def ready(self) -> ForkServer | None:
        """The fork server to fork from: waits while the first one starts
        (at most its start timeout); None when there is none (off, not
        running, given up, or between a death and its replacement)."""
        if not self._running:
            return None
        with anyio.move_on_after(self.start_timeout + 1):
            await self._settled.wait()
        server = self.current
        return None if server is None or server.lost else server
