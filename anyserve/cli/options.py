"""Options and helpers shared by the ``anyserve`` commands."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from anyserve.errors import AnyServeError

T = TypeVar("T")

DEFAULT_API = "http://127.0.0.1:8080"
ApiUrl = Annotated[str, typer.Option("--api-server", help="API server URL.")]

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
    typer.Option(
        help="trace, debug, info, warning or error. debug explains every routing decision;"
        " trace adds the debug lines of the libraries underneath (httpx, gRPC, asyncio).",
    ),
]
LogFormat = Annotated[
    str,
    typer.Option(
        help="text, or json: one JSON object per line (access-log fields as keys),"
        " workers' lines too.",
    ),
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
SequenceIdleTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds a Triton sequence (or X-Session-Id session) may go without a request"
        " before its replica affinity is forgotten.",
    ),
]
Grace = Annotated[
    float,
    typer.Option(
        help="Seconds in-flight requests (streams too) get to finish on SIGTERM/Ctrl-C;"
        " then they end with 503 or an error event.",
    ),
]
InsecureRegister = Annotated[
    bool,
    typer.Option(
        help="Serve on a non-loopback --host without a token anyway (registration then"
        " still only from this machine).",
    ),
]
ReplicaNetworks = Annotated[
    str | None,
    typer.Option(
        help="Networks (CIDR,...) replica endpoints must be in, e.g. 10.0.0.0/8.",
    ),
]
RegistryUrl = Annotated[
    str,
    typer.Option(
        "--registry",
        help="Where registrations are shared: 'memory' (this API server only) or a Redis"
        " URL such as redis://host:6379/0 that several API servers share (needs"
        " anyserve[redis]).",
    ),
]
HeaderTimeout = Annotated[
    float,
    typer.Option(
        help="Seconds a client has to send a request line and headers (from connecting,"
        " or from the previous response); then the connection is closed.",
    ),
]
BodyTimeout = Annotated[
    float,
    typer.Option(help="Seconds a request body may go without a byte before 408 and close."),
]
KeepaliveTimeout = Annotated[
    float, typer.Option(help="Seconds an idle keep-alive HTTP connection is kept open.")
]
MaxConnections = Annotated[
    int,
    typer.Option(
        help="Open HTTP connections at most (kept below the open-file limit); a new one"
        " evicts the oldest idle or half-open one, or gets 503 when all are busy.",
    ),
]
ShmThresholdKib = Annotated[
    int,
    typer.Option(
        help="Raw (binary) inputs of at least this many KiB reach a replica on this host"
        " through /dev/shm instead of gRPC, and big outputs come back that way; 0: never.",
    ),
]
BigBodySlots = Annotated[
    int,
    typer.Option(
        help="JSON bodies over 1 MiB parsed at once; others wait up to 10 s, then 429.",
    ),
]
StartTimeout = Annotated[
    float,
    typer.Option(
        min=0.001,
        help="Seconds a worker may take to start (load its model) before it is killed and"
        " restarted; a handler's own start_timeout wins.",
    ),
]

StuckCallGrace = Annotated[
    float,
    typer.Option(
        min=0.001,
        help="Seconds a call may go on running after its deadline or cancellation (a sync"
        " handler's thread cannot be stopped) before its worker takes no new calls and is"
        " replaced once its other calls end.",
    ),
]
MaxMemoryMib = Annotated[
    float | None,
    typer.Option(
        min=0.001,
        help="Resident memory (MiB) one worker may hold before it takes no new calls and is"
        " replaced once its calls end; a handler's own max_memory_mib wins (default: no"
        " limit).",
    ),
]

Lane = Annotated[
    bool,
    typer.Option(
        "--lane/--no-lane",
        help="Also take inference calls from processes on this host (an API server's"
        " to a replica, workers' context.call to the API server) over a Unix socket,"
        " which costs a fraction of gRPC's CPU; off: gRPC only.",
    ),
]
ForkServer = Annotated[
    bool,
    typer.Option(
        "--fork-server/--no-fork-server",
        help="Start workers as forks of a fork server that has anyserve imported (a"
        " preload=False handler's first answer in hundredths of a second); off: each"
        " worker is a new interpreter. On by default where it works (Linux).",
    ),
]


LOG_LEVELS = ("trace", "debug", "info", "warning", "error")


def setup_logging(level: str, log_format: str = "text") -> str:
    """Configure logging for ``--log-level`` and ``--log-format`` (text or
    json, handed to worker processes through the environment); returns the
    level to hand to child processes (``trace`` is ``debug`` with the
    libraries' lines). Raises typer.BadParameter for an unknown level or format."""
    from anyserve import logs
    from anyserve.launch import configure_logging

    level = level.lower()
    if level not in LOG_LEVELS:
        raise typer.BadParameter(
            f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}"
        )
    if log_format not in logs.FORMATS:
        raise typer.BadParameter(
            f"--log-format must be one of {', '.join(logs.FORMATS)}, not {log_format!r}"
        )
    return configure_logging(level, log_format)


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


def fail(error: AnyServeError) -> NoReturn:
    """End a command that talks to a server: the error as one line on stderr
    (``anyserve: Unavailable (503): cannot reach ...``), exit code 1."""
    typer.echo(f"anyserve: {type(error).__name__} ({error.http_status}): {error.message}", err=True)
    raise typer.Exit(1)


def run_client(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` (talks to a server) in an event loop; an anyserve error it
    raises (unreachable server, error answer) ends the command with :func:`fail`."""
    import anyio

    from anyserve.errors import AnyServeError

    try:
        return anyio.run(main)
    except AnyServeError as error:
        fail(error)


def event_loop_options() -> dict[str, object]:
    from anyserve.replica.worker import event_loop_options

    return event_loop_options()


# Typer ships its own click: its UsageError (bad flags and values) is the base of
# the public typer.BadParameter.
_UsageError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


def run_command(app: typer.Typer, prog_name: str) -> NoReturn:
    """Run a Typer app as a program. A usage mistake (unknown flag, bad value)
    is one line on stderr and exit code 2, not a framed usage box."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name=prog_name, standalone_mode=False)
    except _UsageError as error:
        exc: Any = error  # typer's click exception: ctx, format_message()
        ctx = exc.ctx
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            raise SystemExit(0) from None
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        typer.echo(f"anyserve: {exc.format_message()}{hint}", err=True)
        raise SystemExit(2) from None
    except typer.Abort:
        typer.echo("anyserve: aborted", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
