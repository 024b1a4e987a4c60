"""The ``anyserve`` command line (Typer).

Commands: ``run`` (a whole local cluster), ``start`` (one replica),
``api-server``, ``workers list|start|stop``, ``infer`` and ``registry``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import anyio
import typer

from anyserve.errors import InvalidArgument

app = typer.Typer(
    name="anyserve",
    help="Capability-routed model serving: API server, replicas and worker processes.",
    no_args_is_help=True,
    add_completion=False,
)


NoMatch = Annotated[
    str,
    typer.Option(
        help="When no replica matches: 'reject' answers 404, 'random' sends the request to "
        "a random replica not yet visited, which may know one that serves it (delegation).",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="ANYSERVE_TOKEN", help="Shared secret required for registration and admin."
    ),
]
LogLevel = Annotated[
    str,
    typer.Option(help="debug, info, warning or error (debug explains every routing decision)."),
]
Host = Annotated[str, typer.Option(help="Address to bind.")]
HttpPort = Annotated[int, typer.Option("--port", help="API server HTTP port.")]
GrpcPort = Annotated[int, typer.Option(help="API server gRPC port (KServe v2 proxy; 0: any).")]
HopLimit = Annotated[int, typer.Option(help="Most delegation hops before 508.")]
Heartbeat = Annotated[
    float, typer.Option(help="Seconds between replica heartbeats (3 missed: dropped).")
]
MaxBodyMib = Annotated[int, typer.Option(help="HTTP body limit in MiB (413 beyond).")]
MaxInflight = Annotated[int, typer.Option(help="Requests in flight per replica before 429.")]
RequestTimeout = Annotated[float, typer.Option(help="Deadline (s) for requests that set none.")]


def _setup_logging(level: str) -> None:
    if level.lower() not in ("debug", "info", "warning", "error"):
        raise typer.BadParameter(
            f"--log-level must be debug, info, warning or error, not {level!r}"
        )
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every heartbeat POST at INFO; keep the operator's log readable.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def parse_resources(text: str | None) -> dict[str, float]:
    """``gpu=1,mem=16`` -> ``{"gpu": 1.0, "mem": 16.0}``; raises typer.BadParameter."""
    resources: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            resources[key.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"expected name=number, got {part!r}") from None
    return resources


def _event_loop_options() -> dict[str, object]:
    from anyserve.replica.worker import event_loop_options

    return event_loop_options()


@app.command()
def start(
    app_spec: Annotated[
        str, typer.Option("--app", help="The app to serve: module:attr or file.py:attr.")
    ],
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one).")] = 50051,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    api_server: Annotated[
        str | None,
        typer.Option(help="API server URL to register with, e.g. http://localhost:8080."),
    ] = None,
    replica_id: Annotated[
        str | None, typer.Option(help="Name in the registry (default host-port).")
    ] = None,
    advertise: Annotated[
        str | None, typer.Option(help="host:port others dial (needed when binding 0.0.0.0).")
    ] = None,
    object_store: Annotated[
        str | None, typer.Option(help="Shared object directory (NFS/NAS across machines).")
    ] = "/tmp/anyserve-objects",
    object_ttl: Annotated[float, typer.Option(help="Seconds an object lives.")] = 3600.0,
    object_max_mib: Annotated[
        float | None, typer.Option(help="Largest object a handler may create, in MiB.")
    ] = None,
    resources: Annotated[
        str | None, typer.Option(help="What this replica has, e.g. gpu=1,mem=16.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="ANYSERVE_TOKEN", help="Shared secret for registration and admin."),
    ] = None,
    grace: Annotated[float, typer.Option(help="Seconds to drain calls on shutdown.")] = 10.0,
    log_level: LogLevel = "info",
) -> None:
    """Start one replica: a KServe v2 gRPC server and its worker processes."""
    from anyserve.replica.server import Replica, ReplicaConfig

    _setup_logging(log_level)
    config = ReplicaConfig(
        app=app_spec,
        port=port,
        host=host,
        replica_id=replica_id,
        api_server=api_server,
        advertise=advertise,
        object_store=object_store,
        object_ttl=object_ttl,
        object_max_size=int(object_max_mib * 1024 * 1024) if object_max_mib else None,
        token=token,
        resources=parse_resources(resources),
        app_dir=os.getcwd(),
        grace=grace,
        log_level=log_level,
    )
    _run_until_signal(Replica(config).run)


def _run_until_signal(serve: Callable[..., Coroutine[Any, Any, Any]]) -> None:
    """Run ``serve`` (an anyio task function) until SIGINT/SIGTERM, then let it
    shut down gracefully."""
    import signal

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(serve)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger("anyserve").info(
                        "received %s, shutting down", signal.Signals(signum).name
                    )
                    break
            tg.cancel_scope.cancel()

    try:
        anyio.run(main, backend_options=_event_loop_options())
    except RuntimeError as exc:
        typer.echo(f"anyserve: {exc}", err=True)
        raise typer.Exit(1) from None
    except InvalidArgument as exc:
        typer.echo(f"anyserve: {exc}", err=True)
        raise typer.Exit(2) from None


# The API server options `api-server` and `run` share (Typer has no option groups).
_API_OPTIONS = (
    "host",
    "port",
    "grpc_port",
    "no_match",
    "token",
    "hop_limit",
    "heartbeat_interval",
    "max_body_mib",
    "max_inflight",
    "request_timeout",
)


def _api_config(values: dict[str, Any]) -> Any:
    """An ApiServerConfig from a command's shared API server options (its
    ``locals()``); typer.BadParameter when they are invalid."""
    from anyserve.api_server.config import MIB, ApiServerConfig

    options = {name: values[name] for name in _API_OPTIONS}
    options["max_body"] = options.pop("max_body_mib") * MIB
    options["max_inflight_per_replica"] = options.pop("max_inflight")
    try:
        return ApiServerConfig(**options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("api-server")
def api_server(
    port: HttpPort = 8080,
    grpc_port: GrpcPort = 8081,
    host: Host = "127.0.0.1",
    no_match: NoMatch = "reject",
    token: Token = None,
    hop_limit: HopLimit = 4,
    heartbeat_interval: Heartbeat = 2.0,
    max_body_mib: MaxBodyMib = 64,
    max_inflight: MaxInflight = 256,
    request_timeout: RequestTimeout = 300.0,
    log_level: LogLevel = "info",
) -> None:
    """Start the API server alone (`python -m anyserve.api_server` is the same command)."""
    from anyserve.api_server.server import ApiServer

    _setup_logging(log_level)
    config = _api_config(locals())

    async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with ApiServer(config):
            task_status.started()
            await anyio.sleep_forever()

    _run_until_signal(serve)


@app.command()
def run(
    apps: Annotated[
        list[str], typer.Argument(help="Apps to serve, one replica each (module:attr).")
    ],
    port: HttpPort = 8080,
    grpc_port: GrpcPort = 8081,
    host: Host = "127.0.0.1",
    no_match: NoMatch = "reject",
    token: Token = None,
    hop_limit: HopLimit = 4,
    heartbeat_interval: Heartbeat = 2.0,
    max_body_mib: MaxBodyMib = 64,
    max_inflight: MaxInflight = 256,
    request_timeout: RequestTimeout = 300.0,
    object_store: Annotated[
        str | None, typer.Option(help="Object directory (default: a temporary one).")
    ] = None,
    resources: Annotated[
        str | None, typer.Option(help="What each replica has, e.g. gpu=1.")
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run a whole local system: an API server plus one replica per app."""
    from anyserve.cluster import start_cluster

    _setup_logging(log_level)
    config = _api_config(locals())
    options: dict[str, Any] = {"host": host, "app_dir": os.getcwd(), "log_level": log_level}
    if resources:
        options["resources"] = parse_resources(resources)

    async def serve(*, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with start_cluster(
            apps, api=config, object_store=object_store, replica_options=options
        ) as cluster:
            typer.echo(cluster.describe())
            typer.echo("anyserve is running; press Ctrl-C to stop.")
            task_status.started()
            await anyio.sleep_forever()

    _run_until_signal(serve)


workers_app = typer.Typer(
    help="List, start and stop a replica's worker processes.", no_args_is_help=True
)
app.add_typer(workers_app, name="workers")

Replica = Annotated[str, typer.Option("--replica", help="The replica's gRPC address, HOST:PORT.")]


ADMIN_TIMEOUT = 180.0


def _admin(replica: str, token: str | None, method: str, request: Any) -> Any:
    import grpc

    from anyserve._proto import admin_pb2 as apb
    from anyserve.replica import admin

    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(replica) as channel:
        call = channel.unary_unary(
            f"/{admin.SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=apb.WorkersReply.FromString,
        )
        try:
            # Longer than a worker's start timeout (120 s) plus a drain (30 s),
            # so `workers start/stop` report the outcome rather than giving up.
            return call(request, metadata=metadata, timeout=ADMIN_TIMEOUT)
        except grpc.RpcError as exc:
            typer.echo(f"anyserve: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from None


def _print_workers(reply: Any) -> None:
    """One row per worker; a failed worker's reason goes last, unpadded."""
    rows = [("ID", "CAPABILITY", "PID", "STATE", "INFLIGHT", "RESTARTS", "ERROR")]
    for w in reply.workers:
        cap = ",".join(f"{k}={v}" for k, v in sorted(w.capability.items()))
        rows.append(
            (w.id, cap, str(w.pid or "-"), w.state, str(w.inflight), str(w.restarts), w.error)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        typer.echo("  ".join([*cells, row[-1]]).rstrip())


@workers_app.command("list")
def workers_list(replica: Replica, token: Token = None) -> None:
    """One row per worker: id, capability, pid, state."""
    from anyserve._proto import admin_pb2 as apb

    _print_workers(_admin(replica, token, "ListWorkers", apb.ListWorkersRequest()))


@workers_app.command("start")
def workers_start(
    capability: Annotated[str, typer.Argument(help="Handler name or capability, e.g. type=heavy.")],
    replica: Replica,
    count: Annotated[int, typer.Option(help="Workers wanted (0: the handler's default).")] = 0,
    token: Token = None,
) -> None:
    """Start workers for a capability; the replica registers it at once."""
    from anyserve._proto import admin_pb2 as apb

    _print_workers(
        _admin(
            replica,
            token,
            "StartWorker",
            apb.StartWorkerRequest(capability=capability, count=count),
        )
    )


@workers_app.command("stop")
def workers_stop(
    worker: Annotated[
        str, typer.Argument(help="Worker id (see `workers list`), handler or capability.")
    ],
    replica: Replica,
    drain: Annotated[bool, typer.Option(help="Let in-flight calls finish first.")] = True,
    token: Token = None,
) -> None:
    """Stop a worker (draining its calls); its capability leaves the registry first."""
    from anyserve._proto import admin_pb2 as apb

    _print_workers(
        _admin(replica, token, "StopWorker", apb.StopWorkerRequest(worker_id=worker, drain=drain))
    )


ApiUrl = Annotated[str, typer.Option("--api-server", help="API server URL.")]


def _parse_pairs(items: list[str], what: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{what} must look like key=value, got {item!r}")
        pairs[key] = value
    return pairs


@app.command()
def infer(
    capability: Annotated[
        list[str], typer.Option("--capability", "-c", help="Capability key=value (repeatable).")
    ],
    input: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="Input name=text (repeatable).")
    ] = None,
    stream: Annotated[
        bool, typer.Option(help="Stream the answer (tokens as they arrive).")
    ] = False,
    api: ApiUrl = "http://127.0.0.1:8080",
) -> None:
    """Send one request through the API server and print the outputs."""
    from anyserve import codec
    from anyserve.client import Client
    from anyserve.errors import AnyServeError

    query = _parse_pairs(capability, "--capability")
    inputs = _parse_pairs(input or [], "--input")

    def show(value: Any) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

    async def main() -> None:
        async with Client(api) as client:
            if stream:
                async for chunk in client.stream(query, inputs):
                    outputs = codec.decode_outputs(chunk)
                    text = outputs.get("text_output")
                    if text is not None and len(outputs) <= 2:
                        typer.echo(show(text), nl=False)
                    else:
                        typer.echo(" ".join(f"{k}={show(v)}" for k, v in outputs.items()))
                typer.echo()
            else:
                response = await client.infer(query, inputs)
                for name, value in codec.decode_outputs(response).items():
                    typer.echo(f"{name}: {show(value)}")

    try:
        anyio.run(main)
    except AnyServeError as exc:
        typer.echo(f"anyserve: {type(exc).__name__} ({exc.http_status}): {exc.message}", err=True)
        raise typer.Exit(1) from None


@app.command()
def registry(api: ApiUrl = "http://127.0.0.1:8080") -> None:
    """Print the API server's registry: replicas, capabilities, workers."""
    from anyserve.client import Client

    async def main() -> dict[str, Any]:
        async with Client(api) as client:
            return await client.registry()

    data = anyio.run(main)
    replicas = data.get("replicas", [])
    if not replicas:
        typer.echo("no replicas registered")
    for rep in replicas:
        typer.echo(
            f"{rep.get('replica_id')}  {rep.get('endpoint')}  in-flight {rep.get('in_flight', 0)}"
        )
        for cap in rep.get("capabilities", []):
            typer.echo(f"    loaded    {','.join(f'{k}={v}' for k, v in cap.items())}")
        for cap in rep.get("loadable", []):
            typer.echo(f"    loadable  {','.join(f'{k}={v}' for k, v in cap.items())}")
        for w in rep.get("workers", []):
            typer.echo(f"    worker {w.get('id')}  pid {w.get('pid')}  {w.get('state')}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
