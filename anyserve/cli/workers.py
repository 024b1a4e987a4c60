"""``anyserve workers list|start|stop``: a replica's admin service from the shell."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from anyserve.cli.options import Token

app = typer.Typer(help="List, start and stop a replica's worker processes.", no_args_is_help=True)

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


@app.command("list")
def workers_list(replica: Replica, token: Token = None) -> None:
    """One row per worker: id, capability, pid, state."""
    from anyserve._proto import admin_pb2 as apb

    _print_workers(_admin(replica, token, "ListWorkers", apb.ListWorkersRequest()))


@app.command("start")
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


@app.command("stop")
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
