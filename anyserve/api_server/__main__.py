"""``python -m anyserve.api_server --port 8080``.

The same command as ``anyserve api-server``: one definition of the options,
in :mod:`anyserve.cli.serving`.
"""

from __future__ import annotations

import typer


def main() -> None:
    """Entry point of ``python -m anyserve.api_server``."""
    from anyserve.cli.options import run_command
    from anyserve.cli.serving import api_server

    # A one-command Typer app runs the command without a subcommand name.
    standalone = typer.Typer(add_completion=False)
    standalone.command()(api_server)
    run_command(standalone, "python -m anyserve.api_server")


if __name__ == "__main__":
    main()
