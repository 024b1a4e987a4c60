"""The ``anyserve`` command line (Typer).

Commands: ``run`` (a whole local cluster), ``start`` (one replica),
``api-server``, ``workers list|start|stop``, ``infer`` and ``registry``; each
lives in the module named after what it does (``serving``, ``workers``,
``client``), with the options they share in ``options``.
"""

from __future__ import annotations

import typer

from anyserve.cli import client, serving, workers

app = typer.Typer(
    name="anyserve",
    help="Capability-routed model serving: API server, replicas and worker processes.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(serving.start)
app.command("api-server")(serving.api_server)
app.command()(serving.run)
app.add_typer(workers.app, name="workers")
app.command()(client.infer)
app.command()(client.registry)


def main() -> None:
    """Console-script entry point."""
    app()
