"""The commands that serve: ``start`` (one replica), ``api-server`` and ``run``
(a whole local system). Each runs until SIGINT/SIGTERM, then shuts down
gracefully."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from anyserve.cli.options import (
    BigBodySlots,
    BodyTimeout,
    ForkServer,
    Grace,
    GrpcPort,
    HeaderTimeout,
    Heartbeat,
    HopLimit,
    Host,
    HttpPort,
    InsecureRegister,
    KeepaliveTimeout,
    Lane,
    LogFormat,
    LogLevel,
    MaxBodyMib,
    MaxConnections,
    MaxInflight,
    MaxMemoryMib,
    NoMatch,
    RegistryUrl,
    ReplicaNetworks,
    RequestTimeout,
    SequenceIdleTimeout,
    ShmThresholdKib,
    StartTimeout,
    StuckCallGrace,
    Token,
    parse_resources,
    setup_logging,
)
from anyserve.launch import Plan, launch
from anyserve.replica.processes import DEFAULT_START_TIMEOUT, STUCK_CALL_GRACE
from anyserve.replica.spawning import FORK_SERVER_SUPPORTED


def start(
    app_spec: Annotated[
        str, typer.Option("--app", help="The app to serve: module:attr or file.py:attr.")
    ],
    port: Annotated[int, typer.Option(help="gRPC port (0 picks a free one).")] = 50051,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    api_server: Annotated[
        str | None,
        typer.Option(
            help="API server URL to register with, e.g. http://localhost:8080; several"
            " (URL1,URL2: API servers sharing a --registry) fail over in order."
        ),
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
    object_sweep_interval: Annotated[
        float,
        typer.Option(
            min=0.001,
            help="Seconds between sweeps that remove expired objects (and measure the store).",
        ),
    ] = 60.0,
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
    start_timeout: StartTimeout = DEFAULT_START_TIMEOUT,
    stuck_call_grace: StuckCallGrace = STUCK_CALL_GRACE,
    max_memory_mib: MaxMemoryMib = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve GET /metrics (Prometheus) on this port of --host; 0: any."),
    ] = None,
    fork_server: ForkServer = FORK_SERVER_SUPPORTED,
    lane: Lane = True,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Start one replica: a KServe v2 gRPC server and its worker processes."""
    from anyserve.replica.server import ReplicaConfig

    effective = setup_logging(log_level, log_format)
    config = ReplicaConfig(
        app=app_spec,
        port=port,
        host=host,
        replica_id=replica_id,
        api_server=api_server,
        advertise=advertise,
        object_store=object_store,
        object_ttl=object_ttl,
        object_sweep_interval=object_sweep_interval,
        object_max_size=int(object_max_mib * 1024 * 1024) if object_max_mib else None,
        token=token,
        resources=parse_resources(resources),
        app_dir=os.getcwd(),
        grace=grace,
        start_timeout=start_timeout,
        stuck_call_grace=stuck_call_grace,
        max_memory_mib=max_memory_mib,
        log_level=effective,
        metrics_port=metrics_port,
        fork_server=fork_server,
        lane=lane,
    )
    launch(Plan("replica", config, log_level.lower(), log_format))


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
    "sequence_idle_timeout",
    "shm_threshold_kib",
    "insecure_register",
    "replica_networks",
    "grace",
)


def _api_config(values: dict[str, Any]) -> Any:
    """An ApiServerConfig from a command's shared API server options (its
    ``locals()``); typer.BadParameter when they are invalid."""
    from anyserve.api_server.config import MIB, ApiServerConfig

    options = {name: values[name] for name in _API_OPTIONS}
    options["max_body"] = options.pop("max_body_mib") * MIB
    options["max_inflight_per_replica"] = options.pop("max_inflight")
    options["shm_threshold"] = options.pop("shm_threshold_kib") * 1024
    options["shutdown_grace"] = options.pop("grace")
    networks = options.pop("replica_networks") or ""
    options["replica_networks"] = tuple(n for n in networks.split(",") if n.strip())
    if "registry" in values:  # `api-server` only: `run` is one API server
        options["registry"] = values["registry"]
    if "lane" in values:  # `run --no-lane` turns the replicas' lanes off too
        options["lane"] = values["lane"]
    try:
        return ApiServerConfig(**options)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


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
    sequence_idle_timeout: SequenceIdleTimeout = 60.0,
    shm_threshold_kib: ShmThresholdKib = 1024,
    insecure_register: InsecureRegister = False,
    replica_networks: ReplicaNetworks = None,
    grace: Grace = 10.0,
    registry: RegistryUrl = "memory",
    header_timeout: HeaderTimeout = 10.0,
    body_timeout: BodyTimeout = 30.0,
    keepalive_timeout: KeepaliveTimeout = 5.0,
    max_connections: MaxConnections = 1000,
    big_body_slots: BigBodySlots = 2,
    lane: Lane = True,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Start the API server alone (`python -m anyserve.api_server` is the same command)."""
    from anyserve.api_server.limits import EdgeLimits

    setup_logging(log_level, log_format)
    config = _api_config(locals())
    try:
        config.edge = EdgeLimits(
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            keepalive_timeout=keepalive_timeout,
            max_connections=max_connections,
            big_body_slots=big_body_slots,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    launch(Plan("api", config, log_level.lower(), log_format))


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
    sequence_idle_timeout: SequenceIdleTimeout = 60.0,
    shm_threshold_kib: ShmThresholdKib = 1024,
    insecure_register: InsecureRegister = False,
    replica_networks: ReplicaNetworks = None,
    grace: Grace = 10.0,
    object_store: Annotated[
        str | None, typer.Option(help="Object directory (default: a temporary one).")
    ] = None,
    resources: Annotated[
        str | None, typer.Option(help="What each replica has, e.g. gpu=1.")
    ] = None,
    start_timeout: StartTimeout = DEFAULT_START_TIMEOUT,
    fork_server: ForkServer = FORK_SERVER_SUPPORTED,
    lane: Lane = True,
    log_level: LogLevel = "info",
    log_format: LogFormat = "text",
) -> None:
    """Run a whole local system: an API server plus one replica per app."""
    effective = setup_logging(log_level, log_format)
    config = _api_config(locals())
    options: dict[str, Any] = {
        "host": host,
        "app_dir": os.getcwd(),
        "log_level": effective,
        "start_timeout": start_timeout,
        "grace": grace,
        "fork_server": fork_server,
        "lane": lane,
        "metrics_port": 0,  # each replica's /metrics on a free port (printed)
    }
    if resources:
        options["resources"] = parse_resources(resources)

    plan = Plan("run", config, log_level.lower(), log_format, apps, object_store, options)
    launch(plan)
