"""The replica: a grpc.aio KServe v2 server in front of worker processes.

``Replica.run`` goes through three steps, like uvicorn's ``Server``:

* :meth:`Replica.startup` describes the app (in a throwaway process), binds the
  port and builds the parts (manager, dispatcher, services) in an immutable
  :class:`Running`; then the manager starts the preloaded workers;
* :meth:`Replica.serve` serves ``inference.GRPCInferenceService`` (plus the
  admin service), sweeps the object store and registers with the API server
  when one is given, until cancelled;
* :meth:`Replica.shutdown` then goes in order: unregister, stop taking calls and
  drain in-flight ones within the grace period, close the API channel, stop
  the workers (the manager is shielded, so they outlive the drain).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import grpc
import grpc.aio

from anyserve import memory, rpc, shm, tracing, wire
from anyserve.app import HandlerInfo
from anyserve.calls import ApiChannel, ApiDelegator
from anyserve.errors import StartupError
from anyserve.lane_server import LaneServer
from anyserve.objects import ObjectStore
from anyserve.objects.directory import prepare_root
from anyserve.objects.peers import OBJECT_SOURCE_ENV
from anyserve.objects.service import ObjectsServicer
from anyserve.replica import status
from anyserve.replica.admin import AdminServicer
from anyserve.replica.dispatcher import Dispatcher
from anyserve.replica.in_flight import InFlight
from anyserve.replica.lane import replica_lane
from anyserve.replica.manager import Manager
from anyserve.replica.processes import (
    DEFAULT_START_TIMEOUT,
    DESCRIBE_TIMEOUT,
    START_PROGRESS_INTERVAL,
    STUCK_CALL_GRACE,
    WATCH_INTERVAL,
    WorkerConfig,
    describe_app,
)
from anyserve.replica.registration import Registration
from anyserve.replica.servicer import InferenceServicer
from anyserve.replica.spawning import FORK_SERVER_SUPPORTED

if TYPE_CHECKING:
    # Loaded with --metrics-port only: prometheus_client is not needed without it.
    from anyserve.metrics.replica import ReplicaMetrics, WorkerRow

log = logging.getLogger("anyserve.replica")


@dataclass
class ReplicaConfig:
    """Everything ``anyserve start`` accepts."""

    app: str
    port: int = 50051
    host: str = "127.0.0.1"
    replica_id: str | None = None
    api_server: str | None = None
    advertise: str | None = None
    object_store: str | None = None
    object_ttl: float = 3600.0
    object_max_size: int | None = None
    # Seconds between the object store sweeper's passes (expiry, and the
    # objects/bytes gauges of /metrics).
    object_sweep_interval: float = 60.0
    token: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    app_dir: str | None = None
    grace: float = 10.0
    max_message: int = rpc.DEFAULT_MAX_MESSAGE
    log_level: str = "info"
    # Seconds a worker may take to start (a handler's own start_timeout wins),
    # and between its "still loading" log lines meanwhile.
    start_timeout: float = DEFAULT_START_TIMEOUT
    start_progress_interval: float = START_PROGRESS_INTERVAL
    # Recycling a worker: a call running this long after its deadline or
    # cancellation; resident memory over this many MiB (a handler's own
    # max_memory_mib wins; None: no limit); seconds between the checks.
    stuck_call_grace: float = STUCK_CALL_GRACE
    max_memory_mib: float | None = None
    watch_interval: float = WATCH_INTERVAL
    # Port of GET /metrics on ``host`` (0: any free one; None: no metrics).
    metrics_port: int | None = None
    # Fork workers from a fork server (anyserve.replica.spawning; Linux) instead
    # of starting each as a new interpreter.
    fork_server: bool = FORK_SERVER_SUPPORTED
    # Take inference calls from an API server on this host over a Unix socket
    # (anyserve.replica.lane) as well as over gRPC.
    lane: bool = True


@dataclass(frozen=True)
class Running:
    """The parts of a replica that exist once :meth:`Replica.startup` has
    described its app and bound its port."""

    app_name: str
    handlers: list[HandlerInfo]
    port: int
    replica_id: str
    server: grpc.aio.Server
    manager: Manager
    dispatcher: Dispatcher
    registration: Registration | None
    api_channel: ApiChannel | None
    store: ObjectStore | None
    metrics: ReplicaMetrics | None = None
    lane: LaneServer | None = None


class Replica:
    """One replica process's serving machinery (usable in-process in tests).

    :meth:`run` is :meth:`startup`, then the workers (the manager's task),
    :meth:`serve` until cancelled and :meth:`shutdown`. ``handlers``,
    ``manager``, ``dispatcher``, ``port``, ``replica_id`` and ``registration``
    are there once startup has run (``run`` reports started after it).
    """

    # Set once, by startup(); read it through `running`.
    _running: Running

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        #: The bound port of GET /metrics once serving (0: none).
        self.metrics_port = 0
        #: The local lane's socket once serving (None: no lane).
        self.lane_path: str | None = None

    @property
    def running(self) -> Running:
        """What :meth:`startup` built; RuntimeError before it has run."""
        try:
            return self._running
        except AttributeError:
            raise RuntimeError("Replica.startup() has not run") from None

    @property
    def handlers(self) -> list[HandlerInfo]:
        return self.running.handlers

    @property
    def manager(self) -> Manager:
        return self.running.manager

    @property
    def dispatcher(self) -> Dispatcher:
        return self.running.dispatcher

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one chosen for port 0)."""
        return self.running.port

    @property
    def replica_id(self) -> str:
        """The configured id, else ``<hostname>-<port>``."""
        return self.running.replica_id

    @property
    def registration(self) -> Registration | None:
        """The registration with the API server; None when there is no API server."""
        return self.running.registration

    @property
    def endpoint(self) -> str:
        """host:port other processes dial."""
        return self.config.advertise or f"{self.config.host}:{self.port}"

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Replica] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports started (with itself) once workers are
        ready and the port is bound. Raises StartupError when the app cannot be
        loaded or the port cannot be bound."""
        await self.startup()
        async with anyio.create_task_group() as tg:
            # Shielded: the workers outlive the drain in shutdown(), which ends them.
            await tg.start(self.manager.run)
            try:
                if self.running.lane is not None:  # shielded too: its calls drain
                    self.lane_path = await tg.start(self.running.lane.run)
                await self.serve(task_status=task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.shutdown()

    async def startup(self) -> None:
        """Describe the app (in a throwaway process), bind the port and build the
        manager, dispatcher and services. Starts nothing. Raises StartupError
        when the app cannot be loaded, the port cannot be bound or the object
        store directory cannot be used."""
        # Once per process, before the servicer is built: it is traced or not.
        tracing.setup(tracing.REPLICA_SERVICE)
        memory.return_big_blocks()  # tensors pass through: keep the RSS flat
        cfg = self.config
        describe_timeout = max(cfg.start_timeout, DESCRIBE_TIMEOUT)
        app_name, handlers = await describe_app(cfg.app, cfg.app_dir, describe_timeout)
        server = grpc.aio.server(options=rpc.grpc_options(cfg.max_message))
        problem = rpc.bind_problem(cfg.host, cfg.port)
        try:
            port = 0 if problem else server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(
                f"cannot listen for gRPC on {cfg.host}:{cfg.port}: {problem or 'bind failed'}"
            )
        replica_id = cfg.replica_id or f"{socket.gethostname()}-{port}"
        store = None
        if cfg.object_store:
            try:
                warning = prepare_root(cfg.object_store)
            except OSError as exc:
                raise StartupError(
                    f"cannot use object store directory {cfg.object_store}: {exc.strerror or exc}"
                ) from None
            if warning:
                log.warning("%s", warning)
            store = ObjectStore(
                cfg.object_store, ttl=cfg.object_ttl, max_object_size=cfg.object_max_size
            )
        registration, api_channel, delegator = None, None, None
        if cfg.api_server:
            registration = Registration(cfg.api_server, self.registration_body, token=cfg.token)
            api_channel = ApiChannel(
                lambda: registration.grpc_endpoint, cfg.token, lambda: registration.lane
            )
            delegator = ApiDelegator(replica_id, api_channel)
        manager = Manager(
            handlers,
            self._worker_config(replica_id, cfg.advertise or f"{cfg.host}:{port}"),
            resources=cfg.resources,
            on_change=registration.notify if registration is not None else None,
        )
        metrics = None
        if cfg.metrics_port is not None:
            from anyserve.metrics.replica import ReplicaMetrics

            metrics = ReplicaMetrics(
                lambda: _worker_rows(manager), {h.name: str(h.capability) for h in handlers}
            )
            manager.observer = metrics
        dispatcher = Dispatcher(handlers, manager, delegator, max_message=cfg.max_message)
        dispatcher.observer = metrics
        in_flight = InFlight()
        servicer = InferenceServicer(handlers, manager, dispatcher, in_flight)
        admin = AdminServicer(manager, replica_id, cfg.token)
        server.add_generic_rpc_handlers(
            (servicer.generic_handler(), admin.generic_handler(), in_flight.generic_handler())
        )
        if store is not None:  # peers without a shared directory fetch objects here
            server.add_generic_rpc_handlers((ObjectsServicer(store, cfg.token).generic_handler(),))
        self._running = Running(
            app_name=app_name,
            handlers=handlers,
            port=port,
            replica_id=replica_id,
            server=server,
            manager=manager,
            dispatcher=dispatcher,
            registration=registration,
            api_channel=api_channel,
            store=store,
            metrics=metrics,
            lane=replica_lane(dispatcher, replica_id, cfg.max_message + wire.FRAME_HEADROOM)
            if cfg.lane and shm.host_id()
            else None,
        )

    def _worker_config(self, replica_id: str, endpoint: str) -> WorkerConfig:
        cfg = self.config
        return WorkerConfig(
            app=cfg.app,
            app_dir=cfg.app_dir or os.getcwd(),
            replica_id=replica_id,
            object_store=cfg.object_store,
            object_ttl=cfg.object_ttl,
            object_max_size=cfg.object_max_size,
            api_server=cfg.api_server,
            max_frame=cfg.max_message + wire.FRAME_HEADROOM,
            log_level=cfg.log_level,
            start_timeout=cfg.start_timeout,
            start_progress_interval=cfg.start_progress_interval,
            stuck_call_grace=cfg.stuck_call_grace,
            max_memory_mib=cfg.max_memory_mib,
            watch_interval=cfg.watch_interval,
            fork_server=cfg.fork_server,
            env={
                OBJECT_SOURCE_ENV: endpoint,
                **({"ANYSERVE_TOKEN": cfg.token} if cfg.token else {}),
            },
        )

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[Replica] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Take calls until cancelled: start the gRPC server, the object store's
        sweeper and the registration heartbeat, then report started."""
        running = self.running
        async with anyio.create_task_group() as services:
            await running.server.start()
            if running.store is not None:
                swept = None if running.metrics is None else running.metrics.swept
                services.start_soon(
                    running.store.run_sweeper, self.config.object_sweep_interval, swept
                )
            if running.registration is not None:
                services.start_soon(running.registration.run)
            # Segments of an API server killed mid-call would outlive it otherwise.
            services.start_soon(shm.sweep_forever)
            services.start_soon(memory.trim_forever)  # the heap's free pages, back
            log.info(
                "replica %s (app %s) serving %s on %s",
                running.replica_id,
                running.app_name,
                ", ".join(f"{h.name}[{h.capability}]" for h in running.handlers),
                self.endpoint,
            )
            if running.metrics is not None:
                from anyserve.metrics.endpoint import serve_metrics

                self.metrics_port = await services.start(
                    serve_metrics,
                    running.metrics.registry,
                    self.config.host,
                    self.config.metrics_port,
                )
            task_status.started(self)
            await anyio.sleep_forever()

    async def shutdown(self) -> None:
        """Leave the registry, stop taking calls and drain in-flight ones within
        the grace period, close the API channel, then let the workers go."""
        running = self.running
        log.info(
            "replica %s stopping: draining calls (grace %.0fs)",
            running.replica_id,
            self.config.grace,
        )
        if running.registration is not None:
            await running.registration.unregister()
            await running.registration.aclose()
        grace_ends = anyio.current_time() + self.config.grace
        if running.lane is not None:
            await running.lane.stop(self.config.grace)
        await running.server.stop(max(0.0, grace_ends - anyio.current_time()))
        if running.api_channel is not None:
            await running.api_channel.aclose()
        await tracing.aflush()
        log.info("replica %s drained; stopping workers", running.replica_id)
        running.manager.stop()

    def registration_body(self) -> dict[str, Any]:
        """The /register body: loaded and loadable capabilities, and the workers."""
        running = self.running
        return status.registration_body(
            running.manager, running.replica_id, self.endpoint, self.lane_path
        )


def _worker_rows(manager: Manager) -> list[WorkerRow]:
    """Every worker slot, as the replica's /metrics shows it (at scrape time)."""
    from anyserve.metrics.replica import WorkerRow

    return [
        WorkerRow(
            slot.handler.name,
            str(slot.handler.capability),
            slot.state.value,
            slot.restarts,
            slot.recycles,
            slot.starts,
        )
        for slots in manager.slots.values()
        for slot in slots
    ]
