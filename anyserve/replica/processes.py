"""Worker processes at the OS level: describing an app, reaping, exit reasons."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

import anyio

from anyserve.app import HandlerInfo
from anyserve.replica.worker import EXIT_BAD_APP

# Seconds a worker gets to exit after its connection closes, before SIGTERM and
# then SIGKILL.
REAP_GRACE = 5.0


def exit_text(code: int | None) -> str:
    """How a worker process ended, for operators (``was killed by SIGKILL ...``)."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    if code == EXIT_BAD_APP:
        return f"exited with code {code} (could not import the app or find its handler)"
    return f"exited with code {code}"


async def reap(proc: asyncio.subprocess.Process, grace: float = REAP_GRACE) -> int | None:
    """Wait for the process; terminate, then kill it if it lingers."""
    for action in (None, proc.terminate, proc.kill):
        if action is not None:
            with contextlib.suppress(ProcessLookupError):
                action()
        with anyio.move_on_after(grace):
            return await proc.wait()
    return proc.returncode


async def describe_app(
    app: str, app_dir: str | None = None, timeout: float = 120.0
) -> tuple[str, list[HandlerInfo]]:
    """Import the app in a throwaway worker process and return its handlers.

    Raises RuntimeError with the import error when the app cannot be loaded.
    """
    cmd = [sys.executable, "-m", "anyserve.replica.worker", "--describe", "--app", app]
    if app_dir:
        cmd += ["--app-dir", app_dir]
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        with anyio.fail_after(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"cannot load app {app!r}:\n" + "\n".join(tail))
    data = json.loads(out)
    return str(data["name"]), [HandlerInfo.from_dict(h) for h in data["handlers"]]
