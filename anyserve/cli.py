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


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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
    resources: Annotated[
        str | None, typer.Option(help="What this replica has, e.g. gpu=1,mem=16.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(envvar="ANYSERVE_TOKEN", help="Shared secret for registration and admin."),
    ] = None,
    grace: Annotated[float, typer.Option(help="Seconds to drain calls on shutdown.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
