"""``python -m anyserve.replica.describe --app SPEC``: what an app serves.

The replica imports user code only in child processes. Before it starts any
worker, it runs this module once: it imports the app and writes one JSON
document to stdout, either ``{"name", "handlers"}`` or, when the app cannot be
loaded, ``{"error": one line, "traceback": the user's own frames}``. Whatever
the app prints while it is imported goes to stderr, so it can never corrupt
the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import traceback
from typing import Any

from anyserve.app import load_app

# Frames from these files are the machinery of importing, not the user's code.
_MACHINERY = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # anyserve/
    os.path.dirname(importlib.__file__),  # the stdlib's importlib/
    "<frozen importlib",
)


def user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` with anyserve's and importlib's frames left out."""
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(_MACHINERY)
    ]
    if not frames:
        return ""
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(exc)
    return "".join(lines).rstrip()


def failure(spec: str, exc: BaseException) -> dict[str, Any]:
    """The one-line error and the user's traceback for an app that failed to load."""
    if isinstance(exc, ValueError) and str(exc).startswith("app "):
        return {"error": f"cannot load {exc}", "traceback": ""}
    module = spec.partition(":")[0]
    if isinstance(exc, ModuleNotFoundError) and exc.name and module.startswith(exc.name):
        # The app's own module (or a package on its path) does not exist.
        return {"error": f"cannot import app {spec!r}: {exc}", "traceback": ""}
    if isinstance(exc, FileNotFoundError) and module.endswith(".py"):
        return {"error": f"cannot import app {spec!r}: no file {exc.filename}", "traceback": ""}
    return {
        "error": f"app {spec!r} raised while it was imported: {type(exc).__name__}: {exc}",
        "traceback": user_traceback(exc),
    }


def describe(spec: str, app_dir: str | None) -> dict[str, Any]:
    """Import the app and describe it (see the module docstring)."""
    # User prints go to stderr; only the JSON answer goes to stdout.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            app = load_app(spec, app_dir)
        except Exception as exc:
            return failure(spec, exc)
    return {"name": app.name, "handlers": app.describe()}


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m anyserve.replica.describe``."""
    parser = argparse.ArgumentParser(prog="anyserve.replica.describe")
    parser.add_argument("--app", required=True)
    parser.add_argument("--app-dir", default=None)
    args = parser.parse_args(argv)
    answer = describe(args.app, args.app_dir)
    json.dump(answer, sys.stdout)
    sys.stdout.flush()
    sys.exit(1 if "error" in answer else 0)


if __name__ == "__main__":
    main()
