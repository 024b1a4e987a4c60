"""Worker orchestration: which workers run, started at boot, on demand or by
command, and stopped by command or to make room.

The manager owns every worker slot of a replica. Each handler has one or more
*slots* (:mod:`anyserve.replica.slot`); a started slot gets a supervisor task
(:mod:`anyserve.replica.supervisor`) that keeps its worker process
(:mod:`anyserve.replica.processes`) alive until it is stopped. Whether a
handler fits in the replica's declared resources, and which idle workers make
room for it, is :mod:`anyserve.replica.resources`' answer; how the replica
reports its workers is :mod:`anyserve.replica.status`.

Stopping is done by the manager's own task group, never by the caller: a
request that gives up (deadline, client gone) half-way through a switch leaves
no worker half-stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from anyserve.app import HandlerInfo
from anyserve.errors import NotFound, Overloaded, Unavailable
from anyserve.replica.processes import WorkerConfig, WorkerLauncher, seconds
from anyserve.replica.recycling import Watchdog
from anyserve.replica.resources import ResourceBudget
from anyserve.replica.slot import Slot, State
from anyserve.replica.spawning import Spawner
from anyserve.replica.supervisor import Supervisor

if TYPE_CHECKING:
    # Types only: prometheus_client loads only with --metrics-port.
    from anyserve.metrics.replica import SlotObserver

log = logging.getLogger("anyserve.manager")

#: Retry-After (seconds) for a handler that failed or could not start: it stays
#: down until an operator restarts it.
FAILED_RETRY_AFTER = 30.0
#: Retry-After (seconds) while a handler's workers are still (re)starting.
STARTING_RETRY_AFTER = 5.0


class Manager:
    """Starts, supervises and stops the worker processes of one replica.

    Use inside a task group: ``await tg.start(manager.run)``; :meth:`stop` ends
    it and every worker. ``on_change`` is called (synchronously) whenever a
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
        self.on_change = on_change or (lambda: None)
        self.slots: dict[str, list[Slot]] = {h.name: [] for h in handlers}
        self.budget = ResourceBudget(resources or {}, self.slots)
        #: Starts the worker processes (forked by a fork server when the config says).
        self.spawner = Spawner(config.python, fork_server=config.fork_server)
        self.supervisor = Supervisor(
            WorkerLauncher(config, self.on_change, self.spawner), on_change=self.on_change
        )
        self.watchdog = Watchdog(
            self.all_slots,
            self,
            stuck_call_grace=config.stuck_call_grace,
            limit_for=lambda slot: config.max_memory_for(slot.handler),
            interval=config.watch_interval,
        )
        # Handlers stopped by command: not started on demand until started again.
        self.disabled: set[str] = set()
        #: The replica's metrics, when it exports them (given to every slot).
        self.observer: SlotObserver | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stopping = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the preloaded handlers' workers, report started once they are
        ready (or failed), then supervise until :meth:`stop` is called.

        Shielded from outside cancellation on purpose: the replica must drain
        its calls before the workers go, so only ``stop()`` ends this. Until
        it reports started nothing is served yet, so a cancellation while the
        preloaded workers load (Ctrl-C during a long model load) ends it at once.
        """
        with anyio.CancelScope(shield=True) as shield:
            async with anyio.create_task_group() as spawning:
                # Outside the workers' task group: it reports their exits until
                # the last one has been reaped, cancelled or not.
                await spawning.start(self.spawner.run, name="spawner")
                try:
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        tg.start_soon(self.watchdog.run, name="watchdog")
                        preload = self._start_preloaded()
                        shield.shield = False
                        try:
                            await self._wait_preloaded(preload)
                        finally:
                            shield.shield = True
                        task_status.started()
                        await self._stopping.wait()
                        for slot in self.all_slots():
                            slot.shutdown()
                        tg.cancel_scope.cancel()
                finally:
                    self.spawner.close()

    def _start_preloaded(self) -> list[HandlerInfo]:
        """Start the preloaded handlers' workers that fit; return those handlers."""
        preload = []
        for handler in self.handlers.values():
            if not handler.preload or handler.workers == 0:
                continue
            if self.budget.fits(handler, count=handler.workers):
                self.start_handler(handler.name)
                preload.append(handler)
            else:
                log.warning(
                    "not preloading %s: it needs %s per worker and the replica has %s free",
                    handler.name,
                    dict(handler.resources),
                    self.budget.free(),
                )
        return preload

    async def _wait_preloaded(self, preload: list[HandlerInfo]) -> None:
        """Wait while the preloaded handlers' workers start (restarts included),
        each handler for at most its start timeout (plus a second for the kill)."""
        begun = anyio.current_time()
        for handler in preload:
            deadline = begun + self.config.start_timeout_for(handler) + 1
            with anyio.move_on_after(deadline - anyio.current_time()):
                for slot in self.slots[handler.name]:
                    while slot.state is State.STARTING and not self._stopping.is_set():
                        await slot.ready.wait()

    def stop(self) -> None:
        """Stop every worker (their connections close, the processes exit)."""
        self._stopping.set()
        for slot in self.all_slots():
            slot.wake()

    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._tg is None:
            raise RuntimeError("Manager.run() is not running")
        return self._tg

    # -- looking things up ---------------------------------------------------

    def all_slots(self) -> Iterator[Slot]:
        """Every slot, handler by handler (stopped ones included)."""
        for slots in self.slots.values():
            yield from slots

    def slot(self, worker_id: str) -> Slot:
        """The slot called ``worker_id``; raises NotFound."""
        for slot in self.all_slots():
            if slot.id == worker_id:
                return slot
        raise NotFound(f"no worker {worker_id!r} on this replica")

    def handler(self, name: str) -> HandlerInfo:
        """The handler called ``name``; raises NotFound naming the ones there are."""
        try:
            return self.handlers[name]
        except KeyError:
            raise NotFound(
                f"no handler {name!r}; this replica has {sorted(self.handlers)}"
            ) from None

    def free(self) -> dict[str, float]:
        """What the replica's declared ``--resources`` have left."""
        return self.budget.free()

    # -- starting --------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Start a handler's workers on demand, stopping idle workers of other
        handlers when resources are short ("switching" capability).

        Returns at once: the new workers are STARTING (their processes start
        once the stopped workers have exited); wait for them with
        :meth:`acquire`. Raises Overloaded (retry later) when it does not fit
        and no idle worker can make room, NotFound for a handler stopped by
        command.
        """
        handler = self.handler(name)
        if any(s.wanted for s in self.slots[name]):
            return
        if name in self.disabled:
            raise NotFound(
                f"handler {name} was stopped on this replica; "
                f"start it with `anyserve workers start {name}`"
            )
        if self.budget.exceeds_total(handler):
            raise NotFound(
                f"handler {name} needs {dict(handler.resources)} per worker; "
                f"this replica has {self.budget.total} in all"
            )
        victims: list[Slot] = []
        if not self.budget.fits(handler):
            found = self.budget.victims(handler)
            if found is None:
                raise Overloaded(
                    f"cannot start {name} on this replica: it needs {dict(handler.resources)}, "
                    f"{self.budget.free()} is free and no idle worker can make room",
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
        handler = self.handler(name)
        tg = self._task_group()
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
            slot.observer = self.observer
            slots.append(slot)
            started.append(slot)
        for slot in started[:want]:
            slot.start()
            tg.start_soon(
                self.supervisor.supervise, slot, list(after or ()), name=f"supervise {slot.id}"
            )
        self.on_change()
        return started[:want]

    # -- stopping --------------------------------------------------------------

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
        self.handler(name)
        self.disabled.add(name)
        self.on_change()

    def _begin_stop(self, slot: Slot, *, drain: bool) -> None:
        tg = self._task_group()
        # Out of the registration before the process goes.
        slot.begin_drain()
        self.on_change()
        tg.start_soon(self._finish_stop, slot, drain, name=f"stop {slot.id}")

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
        slot.request_stop()

    # -- recycling ---------------------------------------------------------------

    def recycle(self, slot: Slot, reason: str, *, stuck: bool = False) -> None:
        """Replace ``slot``'s worker (see :mod:`anyserve.replica.recycling`): it
        takes no new calls at once, its process is stopped once its other calls
        end (within the drain timeout) and a new one starts. Does nothing
        unless the slot is READY."""
        pid = slot.pid
        if not slot.begin_recycle(reason, stuck=stuck):
            return
        log.warning("recycling worker %s (pid %s): %s", slot.id, pid, reason)
        self.on_change()
        self._task_group().start_soon(self._finish_recycle, slot, name=f"recycle {slot.id}")

    async def _finish_recycle(self, slot: Slot) -> None:
        with anyio.move_on_after(self.config.drain_timeout):
            await slot.idle.wait()
        # Unless the process ended meanwhile (and its replacement may be starting).
        if slot.recycling:
            slot.request_stop()

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
        deadline; without one it ends after the handler's start timeout.

        Raises Unavailable when the handler failed (crash loop) or no worker
        became ready in time, NotFound when it was stopped by command,
        Overloaded when it cannot be started for lack of resources. Whether
        the call may join the worker's queue is :mod:`~anyserve.replica.admission`'s
        decision, not this one's.
        """
        deadline: float | None = None
        began = time.perf_counter()
        while True:
            slot = self.pick(name)
            if slot is not None:
                if self.observer is not None:
                    self.observer.waited(name, time.perf_counter() - began)
                return slot
            slots = self.slots.get(name, [])
            starting = [s for s in slots if s.wanted]
            if not starting:
                failed = [s for s in slots if s.state is State.FAILED]
                if failed:
                    raise Unavailable(
                        f"handler {name} failed: {failed[0].failure}", FAILED_RETRY_AFTER
                    )
                await self.load(name)
                continue
            timeout = self.config.start_timeout_for(self.handler(name))
            if deadline is None:
                deadline = anyio.current_time() + timeout
            with anyio.move_on_after(deadline - anyio.current_time()):
                await _wait_any([s.ready for s in starting])
            if anyio.current_time() >= deadline and self.pick(name) is None:
                raise Unavailable(
                    f"handler {name} has no ready worker after {seconds(timeout)} s"
                    " (start timeout)",
                    STARTING_RETRY_AFTER,
                )


async def _wait_any(events: list[asyncio.Event]) -> None:
    """Return once any of ``events`` is set."""
    async with anyio.create_task_group() as tg:

        async def wait(event: asyncio.Event) -> None:
            await event.wait()
            tg.cancel_scope.cancel()

        for event in events:
            tg.start_soon(wait, event)
