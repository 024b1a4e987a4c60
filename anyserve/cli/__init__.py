"""The ``anyserve`` command line (Typer).

Commands: ``run`` (a whole local cluster), ``start`` (one replica),
``api-server``, ``workers list|start|stop``, ``infer`` and ``registry``; each
lives in the module named after what it does (``serving``, ``workers``,
``client``), with the options they share in ``options``.
"""

from __future__ import annotations

from typing import Annotated

from anyserve import __version__, memory

memory.skip_httpx_cli()  # before typer and the commands import anything of httpx's

import typer  # noqa: E402

from anyserve.cli import client, serving, workers  # noqa: E402
from anyserve.cli.options import run_command  # noqa: E402

app = typer.Typer(
    name="anyserve",
    help="Capability-routed model serving: API server, replicas and worker processes.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"anyserve {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Capability-routed model serving: API server, replicas and worker processes."""


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"anyserve {__version__}")


app.command()(serving.start)
app.command("api-server")(serving.api_server)
app.command()(serving.run)
app.add_typer(workers.app, name="workers")
app.command()(client.infer)
app.command()(client.registry)


def main() -> None:
    """Console-script entry point."""
    run_command(app, "anyserve")
