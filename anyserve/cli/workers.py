"""``anyserve workers list|start|stop``: a replica's admin service from the shell.

``--replica`` is the replica's gRPC address (``HOST:PORT``), or its id in the
API server's registry (``--api-server``; ``GET /registry`` maps ids to
endpoints), which is what ``anyserve run`` prints for replicas on random ports.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from anyserve.cli.options import DEFAULT_API, ApiUrl, Token, fail, run_client

app = typer.Typer(help="List, start and stop a replica's worker processes.", no_args_is_help=True)

Replica = Annotated[
    str,
    typer.Option(
        "--replica",
        help="The replica: its gRPC address HOST:PORT, or its id in the API server's "
        "registry (see `anyserve registry`).",
    ),
]

# How long `workers start/stop` wait for the replica's answer (a start waits
# for the workers to be ready, a stop for the drain). A start that outlives it
# answers "still starting" and goes on: see `anyserve workers list`.
ADMIN_TIMEOUT = 180.0


def is_address(replica: str) -> bool:
    """Whether ``replica`` is a gRPC address (``HOST:PORT``, ``unix:PATH``)
    rather than a replica id."""
    if replica.startswith("unix:"):
        return True
    host, sep, port = replica.rpartition(":")
    return bool(sep and host and port.isdigit())


def resolve(replica: str, api: str, token: str | None) -> str:
    """The gRPC address of ``replica``: itself when it is one, else the endpoint
    the API server's registry has for that id. An unknown id, or an API server
    that cannot be reached, ends the command with one line."""
    if is_address(replica):
        return replica
    from anyserve.cli.client import fetch_registry

    entries = run_client(lambda: fetch_registry(api, token)).get("replicas", [])
    endpoints = {str(e.get("replica_id")): e.get("endpoint") for e in entries}
    if replica not in endpoints:
        have = ", ".join(sorted(endpoints)) if endpoints else "none"
        problem = f"no replica {replica!r} in the registry at {api}; replicas: {have}"
    elif not endpoints[replica]:
        problem = (
            f"the registry at {api} shows replica endpoints only to callers with its token:"
            " pass --token (or set ANYSERVE_TOKEN), or give HOST:PORT"
        )
    else:
        return str(endpoints[replica])
    typer.echo(f"anyserve: {problem}", err=True)
    raise typer.Exit(1)


def _admin(replica: str, api: str, token: str | None, method: str, request: Any) -> Any:
    import grpc

    from anyserve._proto import admin_pb2 as apb
    from anyserve.errors import TRAILER, Unavailable, from_rpc_error
    from anyserve.replica import admin

    address = resolve(replica, api, token)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            f"/{admin.SERVICE}/{method}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=apb.WorkersReply.FromString,
        )
        try:
            return call(request, metadata=metadata, timeout=ADMIN_TIMEOUT)
        except grpc.RpcError as exc:
            error: Any = exc  # grpc's call error: code(), details(), trailing_metadata()
            from_replica = any(key == TRAILER for key, _ in error.trailing_metadata() or ())
            if error.code() == grpc.StatusCode.UNAVAILABLE and not from_replica:
                fail(Unavailable(f"cannot reach the replica at {address}: {error.details()}"))
            fail(from_rpc_error(error))


def _print_workers(reply: Any) -> None:
    """One row per worker; a failed worker's reason (else why it was last
    recycled) goes last, unpadded."""
    rows = [("ID", "CAPABILITY", "PID", "STATE", "INFLIGHT", "RESTARTS", "RECYCLES", "ERROR")]
    for w in reply.workers:
        cap = ",".join(f"{k}={v}" for k, v in sorted(w.capability.items()))
        why = w.error or (f"last recycled: {w.last_recycle}" if w.last_recycle else "")
        counts = (str(w.inflight), str(w.restarts), str(w.recycles))
        rows.append((w.id, cap, str(w.pid or "-"), w.state, *counts, why))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        typer.echo("  ".join([*cells, row[-1]]).rstrip())


@app.command("list")
def workers_list(replica: Replica, api: ApiUrl = DEFAULT_API, token: Token = None) -> None:
    """One row per worker: id, capability, pid, state (starting while it loads)."""
    from anyserve._proto import admin_pb2 as apb

    _print_workers(_admin(replica, api, token, "ListWorkers", apb.ListWorkersRequest()))


@app.command("start")
def workers_start(
    capability: Annotated[str, typer.Argument(help="Handler name or capability, e.g. type=heavy.")],
    replica: Replica,
    count: Annotated[int, typer.Option(help="Workers wanted (0: the handler's default).")] = 0,
    api: ApiUrl = DEFAULT_API,
    token: Token = None,
) -> None:
    """Start workers for a capability; the replica registers it at once."""
    from anyserve._proto import admin_pb2 as apb

    request = apb.StartWorkerRequest(capability=capability, count=count)
    _print_workers(_admin(replica, api, token, "StartWorker", request))


@app.command("stop")
def workers_stop(
    worker: Annotated[
        str, typer.Argument(help="Worker id (see `workers list`), handler or capability.")
    ],
    replica: Replica,
    drain: Annotated[bool, typer.Option(help="Let in-flight calls finish first.")] = True,
    api: ApiUrl = DEFAULT_API,
    token: Token = None,
) -> None:
    """Stop a worker (draining its calls); its capability leaves the registry first."""
    from anyserve._proto import admin_pb2 as apb

    request = apb.StopWorkerRequest(worker_id=worker, drain=drain)
    _print_workers(_admin(replica, api, token, "StopWorker", request))
