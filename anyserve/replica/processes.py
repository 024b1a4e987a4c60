"""Worker processes at the OS level: describing an app, running one worker
process for a slot, reaping, exit reasons.

Dispatcher and worker talk over a Unix socketpair created per process and
handed to the child (no socket files, so nothing to clean up and nothing
another user could connect to). How the process is started — forked by the
replica's fork server, or a new interpreter — is
:mod:`anyserve.replica.spawning`'s business; here it is a
:class:`~anyserve.replica.spawning.WorkerProcess` either way. A worker that
dies fails its in-flight calls at once with UNAVAILABLE naming its exit code.

A worker is *starting* until it says hello (its app imported, its model
loaded). It gets its handler's ``start_timeout`` for that, else the replica's
(:meth:`WorkerConfig.start_timeout_for`); meanwhile the replica logs its
progress every ``start_progress_interval`` seconds, and once the time is up it
warns and kills the worker, which the supervisor then counts as a crash.

A worker whose connection ends (it crashed, or closed its socket and lingers)
fails its in-flight calls within ``EXIT_WAIT`` seconds, naming its exit code
when it has exited by then, without waiting for the reap. A process that cannot
be spawned at all (a missing interpreter, no file descriptors left) is a crash
with that reason, and leaks no socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio

from anyserve import wire
from anyserve.app import HandlerInfo
from anyserve.errors import AnyServeError, StartupError, Unavailable
from anyserve.replica.slot import Slot
from anyserve.replica.spawning import Spawner, WorkerProcess, exit_text

log = logging.getLogger("anyserve.manager")

# Seconds a worker gets to exit after its connection closes, before SIGTERM and
# then SIGKILL.
REAP_GRACE = 5.0
# Seconds a worker that never said hello gets to exit after its connection
# closes before it is terminated (a ready worker gets REAP_GRACE).
REAP_GRACE_STARTING = 0.5
# Seconds a worker may take to start (load its model) unless its handler says.
DEFAULT_START_TIMEOUT = 600.0
# Seconds between "still loading" lines while a worker starts.
START_PROGRESS_INTERVAL = 10.0
# Seconds a worker whose connection ended gets to exit before its in-flight calls
# fail without its exit code (a crash is reaped within milliseconds).
EXIT_WAIT = 0.25
# Seconds between checks of stuck calls and workers' memory (see recycling.py).
WATCH_INTERVAL = 1.0
# Seconds a call may run on after its deadline or cancellation before its worker
# is recycled.
STUCK_CALL_GRACE = 30.0
# Seconds the describe process may take to import the app, at least (an app that
# loads its models at import in every process needs the start timeout there too).
DESCRIBE_TIMEOUT = 120.0


@dataclass
class WorkerConfig:
    """How to start workers (shared by every slot of a replica)."""

    app: str
    app_dir: str | None = None
    replica_id: str = ""
    object_store: str | None = None
    object_ttl: float = 3600.0
    object_max_size: int | None = None
    api_server: str | None = None
    max_frame: int = wire.DEFAULT_MAX_FRAME
    start_timeout: float = DEFAULT_START_TIMEOUT
    start_progress_interval: float = START_PROGRESS_INTERVAL
    drain_timeout: float = 30.0
    log_level: str = "info"
    env: Mapping[str, str] = field(default_factory=dict)
    # The interpreter workers run on (the replica's own).
    python: str = sys.executable
    # Recycling (anyserve.replica.recycling): a call still running this long
    # after its cancellation, or a worker resident over this many MiB (a
    # handler's own max_memory_mib wins; None: no limit), replaces the worker.
    stuck_call_grace: float = STUCK_CALL_GRACE
    max_memory_mib: float | None = None
    watch_interval: float = WATCH_INTERVAL
    # Fork workers from a fork server (anyserve.replica.spawning) rather than
    # start each as a new interpreter. Off here; a replica's config turns it on.
    fork_server: bool = False

    def start_timeout_for(self, handler: HandlerInfo) -> float:
        """Seconds a worker of ``handler`` may take to start: the handler's own
        ``start_timeout``, else the replica's."""
        return self.start_timeout if handler.start_timeout is None else handler.start_timeout

    def max_memory_for(self, handler: HandlerInfo) -> float | None:
        """MiB a worker of ``handler`` may hold resident: the handler's own
        ``max_memory_mib``, else the replica's (None: no limit)."""
        return self.max_memory_mib if handler.max_memory_mib is None else handler.max_memory_mib


def seconds(value: float) -> str:
    """Seconds for a log line: ``600``, ``40``, ``0.5``."""
    return f"{round(value, 1):g}"


async def reap(proc: WorkerProcess, grace: float = REAP_GRACE) -> int | None:
    """Wait for the process; terminate, then kill it if it lingers. Its exit
    code (None: unknown, or it outlived the kill's grace too)."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        with anyio.move_on_after(grace):
            return await proc.wait()
    return proc.returncode


async def describe_app(
    app: str, app_dir: str | None = None, timeout: float = DESCRIBE_TIMEOUT
) -> tuple[str, list[HandlerInfo]]:
    """Import the app in a throwaway process (:mod:`anyserve.replica.describe`)
    and return its name and handlers.

    Raises StartupError with one line naming the problem (and the user's own
    traceback as its detail) when the app cannot be loaded. What the app
    prints while it is imported reaches this process's stderr.
    """
    cmd = [sys.executable, "-m", "anyserve.replica.describe", "--app", app]
    if app_dir:
        cmd += ["--app-dir", app_dir]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE)
    try:
        with anyio.fail_after(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        raise StartupError(f"importing app {app!r} took longer than {timeout:.0f}s") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    try:
        answer = json.loads(out)
    except ValueError:
        raise StartupError(
            f"cannot load app {app!r}: the describe process {exit_text(proc.returncode)}"
        ) from None
    if "error" in answer:
        raise StartupError(str(answer["error"]), str(answer.get("traceback") or ""))
    return str(answer["name"]), [HandlerInfo.from_dict(h) for h in answer["handlers"]]


def worker_command(config: WorkerConfig, slot: Slot, fd: int) -> list[str]:
    """The command line of a worker process for ``slot`` talking over ``fd``.
    The fork server runs the same options (what follows ``-m
    anyserve.replica.worker``) in a fork, so this is the one description of a
    worker either way."""
    cmd = [
        config.python,
        "-m",
        "anyserve.replica.worker",
        "--app",
        config.app,
        "--handler",
        slot.handler.name,
        "--fd",
        str(fd),
        "--worker-id",
        slot.id,
        "--replica-id",
        config.replica_id,
        "--max-frame",
        str(config.max_frame),
        "--log-level",
        config.log_level,
    ]
    if config.app_dir:
        cmd += ["--app-dir", config.app_dir]
    if config.object_store:
        cmd += ["--object-store", config.object_store, "--object-ttl", str(config.object_ttl)]
        if config.object_max_size:
            cmd += ["--object-max-size", str(config.object_max_size)]
    if config.api_server:
        cmd += ["--api-server", config.api_server]
    return cmd


class WorkerLauncher:
    """Runs one worker process for a slot until it exits (the supervisor's
    ``RunWorker``): spawn it on a socketpair, wait for its hello (within the
    start timeout, logging progress), serve its frames, and when the
    connection ends (or the slot's stop is requested) reap the process and
    fail the calls it still had."""

    def __init__(
        self,
        config: WorkerConfig,
        on_change: Callable[[], None],
        spawner: Spawner | None = None,
    ) -> None:
        self.config = config
        self.on_change = on_change
        self.spawner = spawner or Spawner(config.python)

    async def __call__(self, slot: Slot) -> str:
        """Run one worker process for ``slot``; return why it ended."""
        config = self.config
        timeout = config.start_timeout_for(slot.handler)
        try:
            proc, reader, writer = await self._spawn(slot)
        except OSError as exc:
            # Not the worker's fault but no worker either: a crash to the
            # supervisor (backoff, then failed), never an error that would end
            # the manager and every other handler's workers with it.
            reason = f"could not be started: {exc}"
            log.warning("worker %s %s", slot.id, reason)
            return reason
        slot.spawned(proc.pid)
        self.on_change()  # the registry shows the starting worker's pid
        reason = "stopped"
        hello = False
        loading = anyio.Event()  # set once the wait for the hello is over
        try:
            async with anyio.create_task_group() as tg:

                async def watch_stop() -> None:
                    await slot.stop_requested.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_stop)
                tg.start_soon(self._report_loading, slot, proc.pid, timeout, loading)
                try:
                    with anyio.fail_after(timeout):
                        header, _ = await wire.read_frame(reader, config.max_frame)
                    loading.set()
                    if header.WhichOneof("kind") != "hello":
                        raise wire.ConnectionClosed("worker did not say hello")
                    hello = True
                    if not slot.wanted:
                        raise wire.ConnectionClosed("stopped while starting")
                    slot.connect(writer, config.max_frame)
                    log.info(
                        "worker %s (pid %d) ready for %s", slot.id, proc.pid, slot.handler.name
                    )
                    self.on_change()
                    await slot.serve(reader, config.max_frame)
                except TimeoutError:
                    reason = f"did not start within {seconds(timeout)} s"
                    log.warning("worker %s %s; killing it", slot.id, reason)
                except (wire.ConnectionClosed, AnyServeError):
                    pass  # the worker went away; the finally below says why
                tg.cancel_scope.cancel()
        finally:
            loading.set()
            slot.disconnect()
            writer.close()
            with anyio.CancelScope(shield=True):
                code, exited = None, False
                with anyio.move_on_after(EXIT_WAIT):
                    code = await proc.wait()
                    exited = True
                if not exited:
                    # It closed its end but lingers (a handler ignoring its
                    # cancellation, a hung exit): its calls fail now, not after
                    # the reap's grace.
                    why = (
                        "was stopped with calls still running"
                        if slot.stop_requested.is_set()
                        else "closed its connection"
                    )
                    slot.fail_calls(Unavailable(f"worker {slot.id} (pid {proc.pid}) {why}"))
                    # A worker recycled for a stuck call cannot exit by itself.
                    quick = not hello or slot.stuck
                    code = await reap(proc, REAP_GRACE_STARTING if quick else REAP_GRACE)
            ended = exit_text(code, started=hello)
            if reason == "stopped" and slot.wanted:
                reason = ended
            slot.fail_calls(Unavailable(f"worker {slot.id} (pid {proc.pid}) {ended}"))
        return reason

    async def _spawn(
        self, slot: Slot
    ) -> tuple[WorkerProcess, asyncio.StreamReader, asyncio.StreamWriter]:
        """Start a worker process on a new socketpair; raises OSError (every
        socket closed, no process left behind) when it cannot be started."""
        proc, parent = await self.spawner.spawn(
            lambda fd: worker_command(self.config, slot, fd),
            {**os.environ, **self.config.env},
            slot.id,
        )
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        except BaseException:
            parent.close()
            with anyio.CancelScope(shield=True):
                await reap(proc, REAP_GRACE_STARTING)
            raise
        return proc, reader, writer

    async def _report_loading(
        self, slot: Slot, pid: int, timeout: float, loading: anyio.Event
    ) -> None:
        """Log every ``start_progress_interval`` seconds until ``loading`` is set:
        ``worker chat-0 (pid 123) still loading, 40 s of 600 s``."""
        started = anyio.current_time()
        while True:
            with anyio.move_on_after(self.config.start_progress_interval):
                await loading.wait()
                return
            log.info(
                "worker %s (pid %d) still loading, %s s of %s s",
                slot.id,
                pid,
                seconds(anyio.current_time() - started),
                seconds(timeout),
            )
