"""Running the API server: uvicorn (HTTP) and grpc.aio (gRPC) in one event loop.

``ApiServer`` binds both listeners in the current loop and runs uvicorn and
the registry sweeper in a task group it owns; ``serve`` runs one until SIGINT
or SIGTERM. Several servers can run in one process (tests do): nothing is
global, and uvicorn is run without its signal capture.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
from contextlib import AsyncExitStack
from types import TracebackType

import anyio
import grpc.aio
import uvicorn
from anyio.abc import TaskGroup

from anyserve import memory, rpc, shm, tracing, tracing_servers
from anyserve.api_server import guard
from anyserve.api_server.app import build_app
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.connections import ConnectionTable, edge_protocol
from anyserve.api_server.grpc_entry import entry_lane, start_grpc_server
from anyserve.api_server.limits import connection_budget, raise_open_file_limit
from anyserve.api_server.state import ApiState
from anyserve.errors import StartupError
from anyserve.lane_server import LaneServer

logger = logging.getLogger("anyserve.api_server")

__all__ = ["ApiServer", "ApiServerConfig", "serve"]


def _listen(host: str, port: int) -> socket.socket:
    # Bound here rather than by uvicorn so that port 0 works, the real port is
    # known before start() returns, and a taken port raises OSError instead of
    # uvicorn's sys.exit(). SO_REUSEADDR lets a restarted server take its port
    # back at once.
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on
    # accepted sockets that say so, and without it every keep-alive response
    # waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiServer:
    """One API server. ``start()``/``stop()`` or ``async with ApiServer(cfg):``.

    ``start()`` and ``stop()`` must be called from the same task (the task
    group they own is entered in one and left in the other); the ``async with``
    form guarantees it.
    """

    def __init__(self, config: ApiServerConfig | None = None) -> None:
        self.config = config or ApiServerConfig()
        self.state = ApiState(self.config)
        self.http_port = 0
        self.grpc_port = 0
        self._stack: AsyncExitStack | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._grpc: grpc.aio.Server | None = None
        self._tg: TaskGroup | None = None
        #: The gRPC entry's local lane while serving (None: none).
        self.lane: LaneServer | None = None
        self._http_done = anyio.Event()
        #: The HTTP connections open now (and eviction/time-out counts), once started.
        self.connections: ConnectionTable | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP entry (``http://host:port``)."""
        host = self.config.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        return (
            f"http://[{host}]:{self.http_port}"
            if ":" in host
            else f"http://{host}:{self.http_port}"
        )

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` of the gRPC entry."""
        return self.state.grpc_endpoint(None)

    async def start(self) -> None:
        """Bind both listeners and start serving. Raises StartupError when a
        port is taken or the address is not this machine's."""
        if self._stack is not None:
            raise RuntimeError("ApiServer already started")
        # Once per process, before the entries are built: they are traced or not.
        tracing.setup(tracing.API_SERVER_SERVICE)
        memory.return_big_blocks()  # big bodies come and go: keep the RSS flat
        cfg = self.config
        try:
            sock = _listen(cfg.host, cfg.port)
        except OSError as exc:
            raise StartupError(
                f"cannot listen for HTTP on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        stack = AsyncExitStack()
        try:
            problem = rpc.bind_problem(cfg.host, cfg.grpc_port)
            if problem:
                raise StartupError(
                    f"cannot listen for gRPC on {cfg.host}:{cfg.grpc_port}: {problem}"
                )
            try:
                self._grpc, self.grpc_port = await start_grpc_server(
                    self.state, cfg.host, cfg.grpc_port
                )
            except OSError as exc:
                raise StartupError(str(exc)) from None
            self.state.grpc_port = self.grpc_port
            self.http_port = sock.getsockname()[1]
            stack.push_async_callback(self._close_grpc)
            stack.push_async_callback(self.state.pool.close)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            # Connections beyond the cap are evicted or refused by the protocol
            # (connections.py), so the cap must fit the open-file limit.
            raise_open_file_limit()
            edge = cfg.edge
            self.connections = ConnectionTable(edge, connection_budget(edge.max_connections))
            self._uvicorn = uvicorn.Server(
                uvicorn.Config(
                    tracing_servers.asgi(build_app(self.state)),
                    http=edge_protocol(edge, self.connections),
                    timeout_keep_alive=edge.keepalive_timeout,  # type: ignore[arg-type]
                    lifespan="off",
                    log_config=None,
                    access_log=False,
                    ws="none",
                    # After our own grace has ended what still ran (stop()), a
                    # few seconds for those answers to be written.
                    timeout_graceful_shutdown=math.ceil(cfg.shutdown_grace) + 3,
                )
            )
            self._http_done = anyio.Event()
            self._tg.start_soon(self._run_uvicorn, self._uvicorn, sock)
            self._tg.start_soon(self._sweep)
            self._tg.start_soon(self._sweep_shm)
            self._tg.start_soon(memory.trim_forever)
            self._tg.start_soon(self.state.router.abandoned.run)
            if cfg.lane and shm.host_id():  # context.call on this host skips gRPC
                name = f"api-server-{shm.owner_tag()}"
                self.lane = entry_lane(self.state, name)
                path = await self._tg.start(self.lane.run)
                stack.push_async_callback(self.lane.stop, 0.0)  # before the group's exit
                self.state.lane = None if path is None else (path, name)
            # The registry backend keeps the view in step with other API servers'.
            await self._tg.start(self.state.backend.run)
            # uvicorn offers no event for "listening"; its start-up is a few ticks.
            while not self._uvicorn.started and not self._http_done.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.005)
            if not self._uvicorn.started:
                raise RuntimeError("the HTTP server stopped during start-up")
        except BaseException:
            sock.close()
            await stack.aclose()
            raise
        self._stack = stack
        logger.info(
            "anyserve API server: HTTP on %s, gRPC on %s (no-match %s%s)",
            self.url,
            self.grpc_endpoint,
            cfg.no_match,
            ", token required" if cfg.token else "",
        )
        if not cfg.token and not guard.is_loopback(cfg.host):
            logger.warning(
                "serving on %s without a token (--insecure-register): anyone who can reach"
                " it may send requests; replicas may register from this machine only",
                cfg.host,
            )

    async def _run_uvicorn(self, server: uvicorn.Server, sock: socket.socket) -> None:
        # uvicorn's serve() minus capture_signals(): signal handling belongs to
        # whoever runs this server (serve() below, or the embedding program).
        try:
            await server._serve(sockets=[sock])
        finally:
            self._http_done.set()

    async def _sweep(self) -> None:
        registry, pool = self.state.registry, self.state.pool
        period = min(self.config.heartbeat_interval, registry.ttl) / 2
        while True:
            await anyio.sleep(period)
            expired = registry.expire()
            self.state.metrics.heartbeats_expired(len(expired))
            for replica in expired:
                logger.warning(
                    "replica %s (%s) missed its heartbeats for %.1fs; dropped",
                    replica.replica_id,
                    replica.endpoint,
                    registry.ttl,
                )
            await pool.prune(registry.endpoints())

    async def _sweep_shm(self) -> None:
        while True:
            removed = self.state.shared_memory.sweep()
            if removed:
                logger.info("deleted %d shared memory segments no call holds", removed)
            await anyio.sleep(shm.SWEEP_INTERVAL)

    async def _close_grpc(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(self.config.shutdown_grace)
            self._grpc = None

    async def stop(self) -> None:
        """Stop accepting, let running requests finish (up to ``shutdown_grace``
        seconds), then close the gRPC server and every replica channel."""
        stack, self._stack = self._stack, None
        if stack is None:
            return
        self.state.draining = True
        try:
            with anyio.CancelScope(shield=True):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._close_grpc)
                    if self.lane is not None:
                        self.state.lane = None
                        tg.start_soon(self.lane.stop, self.config.shutdown_grace)
                    if self._uvicorn is not None:
                        self._uvicorn.should_exit = True
                        with anyio.move_on_after(self.config.shutdown_grace):
                            await self._http_done.wait()
                        if not self._http_done.is_set():
                            # Grace is over: what still runs answers 503 / an
                            # error event now, rather than being cut.
                            logger.warning(
                                "shutdown grace (%.0fs) over: ending the requests still running",
                                self.config.shutdown_grace,
                            )
                            self.state.expired.set()
                            await self._http_done.wait()
                if self._tg is not None:
                    self._tg.cancel_scope.cancel()
        finally:
            await stack.aclose()
        await tracing.aflush()
        logger.info("anyserve API server stopped")

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(config: ApiServerConfig) -> None:
    """Run an API server until SIGINT or SIGTERM, then stop it gracefully."""
    async with ApiServer(config):
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info("received %s; shutting down", signal.Signals(signum).name)
                break
