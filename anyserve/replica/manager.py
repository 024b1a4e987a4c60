"""Worker processes: starting, supervising, draining and stopping them.

The manager owns every worker process of a replica. Each handler has one or
more *slots*; a slot keeps one worker process alive (restarting it with
exponential backoff after a crash) until it is stopped. A slot whose worker
crash-loops (``CRASH_LIMIT`` crashes in ``CRASH_WINDOW`` seconds) is marked
failed and left alone until it is started again by command.

Dispatcher and worker talk over a Unix socketpair created per process and
inherited by the child (no socket files, so nothing to clean up and nothing
another user could connect to). A worker that dies fails its in-flight calls at
once with UNAVAILABLE naming its exit code.

Resources: a slot holds its handler's ``resources`` from the moment it is
wanted until its process has exited, so the declared ``--resources`` are never
exceeded, not even while a worker drains to make room for another.

Stopping is done by the manager's own task group, never by the caller: a
request that gives up (deadline, client gone) half-way through a switch leaves
no worker half-stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import anyio

from anyserve import wire
from anyserve.app import HandlerInfo
from anyserve.errors import AnyServeError, NotFound, Overloaded, Unavailable
from anyserve.replica.processes import REAP_GRACE, exit_text, reap
from anyserve.replica.slot import Slot, State

log = logging.getLogger("anyserve.manager")

CRASH_LIMIT = 5
CRASH_WINDOW = 60.0
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
# Seconds a worker that never said hello gets to exit after its connection
# closes before it is terminated (a ready worker gets REAP_GRACE).
REAP_GRACE_STARTING = 0.5


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
    start_timeout: float = 120.0
    drain_timeout: float = 30.0
    log_level: str = "info"
    env: Mapping[str, str] = field(default_factory=dict)


class Manager:
    """Starts, supervises and stops the worker processes of one replica.

    Use inside a task group: ``await tg.start(manager.run)``; cancel the group to
    stop every worker. ``on_change`` is called (synchronously) whenever a
    worker's state changes, so registration can follow.
    """

    def __init__(
        self,
        handlers: list[HandlerInfo],
        config: WorkerConfig,
        *,
        resources: Mapping[str, float] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.handlers = {h.name: h for h in handlers}
        self.config = config
        self.resources = dict(resources or {})
        self.on_change = on_change or (lambda: None)
        self.slots: dict[str, list[Slot]] = {h.name: [] for h in handlers}
        # Handlers stopped by command: not started on demand until started again.
        self.disabled: set[str] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the preloaded handlers' workers, report started once they are
        ready (or failed), then supervise until :meth:`stop` is called.

        Shielded from outside cancellation on purpose: the replica must drain
        its calls before the workers go, so only ``stop()`` ends this.
        """
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                self._tg = tg
                preload = []
                for handler in self.handlers.values():
                    if not handler.preload or handler.workers == 0:
                        continue
                    if self.fits(handler, count=handler.workers):
                        self.start_handler(handler.name)
                        preload.append(handler)
                    else:
                        log.warning(
                            "not preloading %s: it needs %s per worker and the replica has %s free",
                            handler.name,
                            dict(handler.resources),
                            self.free(),
                        )
                with anyio.move_on_after(self.config.start_timeout + 1):
                    for handler in preload:
                        for slot in self.slots[handler.name]:
                            while slot.state is State.STARTING and not self._stopping.is_set():
                                await slot.ready.wait()
                task_status.started()
                await self._stopping.wait()
                for slots in self.slots.values():
                    for slot in slots:
                        slot.wanted = False
                tg.cancel_scope.cancel()

    def stop(self) -> None:
        """Stop every worker (their connections close, the processes exit)."""
        self._stopping.set()
        for slots in self.slots.values():
            for slot in slots:
                slot.ready.set()

    # -- resources -------------------------------------------------------------

    def _used(self, exclude: AbstractSet[str] = frozenset()) -> dict[str, float]:
        used: dict[str, float] = {}
        for slots in self.slots.values():
            for slot in slots:
                if slot.holds_resources and slot.id not in exclude:
                    for key, amount in slot.handler.resources.items():
                        used[key] = used.get(key, 0.0) + amount
        return used

    def free(self) -> dict[str, float]:
        """What the replica's declared ``--resources`` have left."""
        used = self._used()
        return {key: total - used.get(key, 0.0) for key, total in self.resources.items()}

    def fits(
        self, handler: HandlerInfo, count: int = 1, exclude: AbstractSet[str] = frozenset()
    ) -> bool:
        """Whether ``count`` more workers of ``handler`` fit in the declared
        resources (a replica that declares none has no limit)."""
        if not self.resources or not handler.resources:
            return True
        used = self._used(exclude)
        return all(
            used.get(key, 0.0) + need * count <= self.resources.get(key, 0.0) + 1e-9
            for key, need in handler.resources.items()
        )

    def exceeds_total(self, handler: HandlerInfo) -> bool:
        """Whether one worker of ``handler`` needs more than the replica has in
        all (it can never run here, whatever is stopped)."""
        return bool(self.resources) and any(
            need > self.resources.get(key, 0.0) + 1e-9 for key, need in handler.resources.items()
        )

    def _idle_victims(self, handler: HandlerInfo) -> list[Slot] | None:
        """Idle workers of other handlers whose stopping makes room, or None."""
        chosen: set[str] = set()
        victims: list[Slot] = []
        for name, slots in self.slots.items():
            if name == handler.name:
                continue
            for slot in slots:
                if self.fits(handler, exclude=chosen):
                    return victims
                overlaps = any(k in handler.resources for k in slot.handler.resources)
                idle = slot.wanted and slot.state is State.READY and slot.inflight == 0
                if idle and overlaps:
                    chosen.add(slot.id)
                    victims.append(slot)
        return victims if self.fits(handler, exclude=chosen) else None

    async def load(self, name: str) -> None:
        """Start a handler's workers on demand, stopping idle workers of other
        handlers when resources are short ("switching" capability).

        Returns at once: the new workers are STARTING (their processes start
        once the stopped workers have exited); wait for them with
        :meth:`acquire`. Raises Overloaded (retry later) when it does not fit
        and no idle worker can make room, NotFound for a handler stopped by
        command.
        """
        handler = self._handler(name)
        if any(s.wanted for s in self.slots[name]):
            return
        if name in self.disabled:
            raise NotFound(
                f"handler {name} was stopped on this replica; "
                f"start it with `anyserve workers start {name}`"
            )
        if self.exceeds_total(handler):
            raise NotFound(
                f"handler {name} needs {dict(handler.resources)} per worker; "
                f"this replica has {self.resources} in all"
            )
        victims: list[Slot] = []
        if not self.fits(handler):
            found = self._idle_victims(handler)
            if found is None:
                raise Overloaded(
                    f"cannot start {name} on this replica: it needs {dict(handler.resources)}, "
                    f"{self.free()} is free and no idle worker can make room",
                    retry_after=1.0,
                )
            victims = found
            for victim in victims:
                log.info("stopping idle worker %s to make room for %s", victim.id, name)
                self._begin_stop(victim, drain=True)
        log.info("starting %s on demand", name)
        self.start_handler(name, after=victims)

    def start_handler(
        self, name: str, count: int | None = None, *, after: list[Slot] | None = None
    ) -> list[Slot]:
        """Start ``count`` more workers for handler ``name`` (default: its
        ``workers``, at least one) and return their slots; failed and stopped
        slots are reused. The processes start once every slot in ``after``
        has stopped. Raises NotFound for an unknown handler."""
        handler = self._handler(name)
        assert self._tg is not None, "Manager.run() is not running"
        self.disabled.discard(name)
        slots = self.slots[name]
        started: list[Slot] = []
        for slot in slots:
            # A slot still draining keeps its process until it exits: not reusable yet.
            if not slot.wanted and slot.stopped.is_set():
                started.append(slot)
        want = count if count is not None else max(handler.workers, 1)
        while len(started) < want:
            slot = Slot(f"{name}-{len(slots)}", handler)
            slots.append(slot)
            started.append(slot)
        for slot in started[:want]:
            slot.wanted = True
            slot.failure = ""
            slot.crashes.clear()
            slot.state = State.STARTING
            slot.ready.clear()
            slot.stopped.clear()
            slot.stop_requested = asyncio.Event()
            self._tg.start_soon(
                self._supervise, slot, list(after or ()), name=f"supervise {slot.id}"
            )
        self.on_change()
        return started[:want]

    async def stop_worker(
        self, worker_id: str, *, drain: bool = True, disable: bool = True
    ) -> Slot:
        """Stop one worker and wait until its process has exited: it takes no
        new calls, in-flight calls finish (up to the drain timeout when
        ``drain``), then the process exits. With ``disable`` (a stop by
        command) the handler is not started on demand again once its last
        worker is gone. Cancelling the wait does not cancel the stop."""
        slot = self.slot(worker_id)
        self.begin_stop(slot, drain=drain, disable=disable)
        await slot.stopped.wait()
        return slot

    def begin_stop(self, slot: Slot, *, drain: bool = True, disable: bool = True) -> None:
        """Start stopping ``slot`` (see :meth:`stop_worker`) without waiting."""
        name = slot.handler.name
        if disable and not any(s.wanted for s in self.slots[name] if s is not slot):
            self.disabled.add(name)
        if slot.wanted:
            self._begin_stop(slot, drain=drain)
        else:
            self.on_change()

    def disable(self, name: str) -> None:
        """Keep handler ``name`` from starting on demand (its running workers
        are left alone) until :meth:`start_handler` starts it again."""
        self._handler(name)
        self.disabled.add(name)
        self.on_change()

    def _begin_stop(self, slot: Slot, *, drain: bool) -> None:
        assert self._tg is not None, "Manager.run() is not running"
        slot.wanted = False
        if slot.state in (State.READY, State.STARTING):
            # Out of the registration before the process goes.
            slot.state = State.DRAINING
        self.on_change()
        self._tg.start_soon(self._finish_stop, slot, drain, name=f"stop {slot.id}")

    async def _finish_stop(self, slot: Slot, drain: bool) -> None:
        if drain:
            with anyio.move_on_after(self.config.drain_timeout):
                await slot.idle.wait()
            if slot.inflight:
                log.warning(
                    "worker %s: %d calls still running after the %.0fs drain timeout",
                    slot.id,
                    slot.inflight,
                    self.config.drain_timeout,
                )
        slot.stop_requested.set()

    def availability(self, name: str) -> str:
        """How the replica offers handler ``name`` to the API server:
        ``loaded`` (a worker is ready), ``loadable`` (a request may start it,
        or its workers are starting), ``failed`` (crash loop), ``stopped``
        (stopped by command) or ``unfit`` (needs more than the replica has)."""
        slots = self.slots.get(name, [])
        if any(s.state is State.READY for s in slots):
            return "loaded"
        if any(s.wanted for s in slots):
            return "loadable"
        if any(s.state is State.FAILED for s in slots):
            return "failed"
        if name in self.disabled:
            return "stopped"
        if self.exceeds_total(self._handler(name)):
            return "unfit"
        return "loadable"

    def loadable(self, name: str) -> bool:
        """True when a request may start this handler on demand."""
        slots = self.slots.get(name, [])
        return (
            name not in self.disabled
            and not any(s.wanted for s in slots)
            and not any(s.state is State.FAILED for s in slots)
            and not self.exceeds_total(self._handler(name))
        )

    def slot(self, worker_id: str) -> Slot:
        for slots in self.slots.values():
            for slot in slots:
                if slot.id == worker_id:
                    return slot
        raise NotFound(f"no worker {worker_id!r} on this replica")

    def _handler(self, name: str) -> HandlerInfo:
        try:
            return self.handlers[name]
        except KeyError:
            raise NotFound(
                f"no handler {name!r}; this replica has {sorted(self.handlers)}"
            ) from None

    # -- choosing a worker ----------------------------------------------------

    def pick(self, name: str) -> Slot | None:
        """The least busy ready worker of a handler, or None."""
        best: Slot | None = None
        for slot in self.slots.get(name, ()):
            if slot.state is State.READY and (best is None or slot.inflight < best.inflight):
                best = slot
        return best

    async def acquire(self, name: str) -> Slot:
        """A ready worker for handler ``name``: waits for one that is starting and
        starts a loadable handler on demand. Callers bound the wait with their
        deadline; without one it ends after the start timeout.

        Raises Unavailable when the handler failed (crash loop) or no worker
        became ready in time, NotFound when it was stopped by command,
        Overloaded when it cannot be started for lack of resources or all its
        workers have max_concurrency x 4 calls queued.
        """
        deadline: float | None = None
        while True:
            slot = self.pick(name)
            if slot is not None:
                limit = slot.handler.max_concurrency * 4
                if slot.inflight >= limit:
                    raise Overloaded(f"handler {name} has {slot.inflight} calls queued", 1.0)
                return slot
            slots = self.slots.get(name, [])
            starting = [s for s in slots if s.wanted]
            if not starting:
                failed = [s for s in slots if s.state is State.FAILED]
                if failed:
                    raise Unavailable(f"handler {name} failed: {failed[0].failure}")
                await self.load(name)
                continue
            if deadline is None:
                deadline = anyio.current_time() + self.config.start_timeout
            with anyio.move_on_after(deadline - anyio.current_time()):
                await _wait_any([s.ready for s in starting])
            if anyio.current_time() >= deadline and self.pick(name) is None:
                raise Unavailable(
                    f"handler {name} has no ready worker after "
                    f"{self.config.start_timeout:.0f}s (start timeout)"
                )

    # -- supervision ---------------------------------------------------------

    def _command(self, slot: Slot, fd: int) -> list[str]:
        cfg = self.config
        cmd = [
            sys.executable,
            "-m",
            "anyserve.replica.worker",
            "--app",
            cfg.app,
            "--handler",
            slot.handler.name,
            "--fd",
            str(fd),
            "--worker-id",
            slot.id,
            "--replica-id",
            cfg.replica_id,
            "--max-frame",
            str(cfg.max_frame),
            "--log-level",
            cfg.log_level,
        ]
        if cfg.app_dir:
            cmd += ["--app-dir", cfg.app_dir]
        if cfg.object_store:
            cmd += ["--object-store", cfg.object_store, "--object-ttl", str(cfg.object_ttl)]
            if cfg.object_max_size:
                cmd += ["--object-max-size", str(cfg.object_max_size)]
        if cfg.api_server:
            cmd += ["--api-server", cfg.api_server]
        return cmd

    async def _supervise(self, slot: Slot, after: list[Slot]) -> None:
        backoff = BACKOFF_START
        try:
            for other in after:
                # Switching: the workers making room must be gone first.
                await other.stopped.wait()
            while slot.wanted:
                started = time.monotonic()
                reason = await self._run_once(slot)
                if not slot.wanted:
                    break
                # A crash: fail fast if it keeps happening, else back off and restart.
                now = time.monotonic()
                slot.crashes.append(now)
                while slot.crashes and now - slot.crashes[0] > CRASH_WINDOW:
                    slot.crashes.popleft()
                if len(slot.crashes) >= CRASH_LIMIT:
                    slot.state = State.FAILED
                    slot.wanted = False
                    slot.failure = (
                        f"worker {slot.id} crashed {len(slot.crashes)} times in "
                        f"{CRASH_WINDOW:.0f}s, the last time: {reason}; start it again "
                        f"with `anyserve workers start {slot.handler.name}`"
                    )
                    log.error("worker %s marked failed: %s", slot.id, slot.failure)
                    slot.ready.set()
                    self.on_change()
                    return
                if now - started > 10 * BACKOFF_MAX:
                    backoff = BACKOFF_START
                log.warning("worker %s %s; restarting in %.1fs", slot.id, reason, backoff)
                slot.state = State.STARTING
                slot.ready.clear()
                slot.restarts += 1
                self.on_change()
                with anyio.move_on_after(backoff):
                    await slot.stop_requested.wait()  # a stop ends the backoff early
                backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            if slot.state is not State.FAILED:
                slot.state = State.STOPPED
            slot.pid = None
            slot.ready.set()
            slot.stopped.set()
            self.on_change()

    async def _run_once(self, slot: Slot) -> str:
        """Run one worker process until it exits; return why it ended."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command(slot, child.fileno()),
                pass_fds=(child.fileno(),),
                env={**os.environ, **self.config.env},
            )
        finally:
            child.close()
        slot.pid = proc.pid
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        reason = "stopped"
        hello = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch_stop() -> None:
                    await slot.stop_requested.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_stop)
                try:
                    with anyio.fail_after(self.config.start_timeout):
                        header, _ = await wire.read_frame(reader, self.config.max_frame)
                    if header.WhichOneof("kind") != "hello":
                        raise wire.ConnectionClosed("worker did not say hello")
                    hello = True
                    if not slot.wanted:
                        raise wire.ConnectionClosed("stopped while starting")
                    slot.connect(writer)
                    log.info(
                        "worker %s (pid %d) ready for %s", slot.id, proc.pid, slot.handler.name
                    )
                    self.on_change()
                    await slot.serve(reader, self.config.max_frame)
                except TimeoutError:
                    reason = f"did not start within {self.config.start_timeout:.0f}s"
                except (wire.ConnectionClosed, AnyServeError):
                    pass  # the worker went away; the finally below says why
                tg.cancel_scope.cancel()
        finally:
            slot.disconnect()
            writer.close()
            with anyio.CancelScope(shield=True):
                code = await reap(proc, REAP_GRACE if hello else REAP_GRACE_STARTING)
            if reason == "stopped" and slot.wanted:
                reason = exit_text(code)
            slot.last_exit = exit_text(code)
            slot.fail_calls(Unavailable(f"worker {slot.id} (pid {proc.pid}) {exit_text(code)}"))
        return reason


async def _wait_any(events: list[asyncio.Event]) -> None:
    """Return once any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: asyncio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)
