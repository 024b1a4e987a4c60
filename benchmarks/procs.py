"""Server processes for the benchmarks, and the protocol they follow.

A server runs as ``python -m <module>`` in its own session (process group), so
the load generator never shares its event loop or its core time slices in one
interpreter. It prints ``LISTENING host:port`` on stdout once it serves, and
stops when its stdin closes (the parent exited, even by SIGKILL) or on
SIGTERM/SIGINT. The parent side, :class:`ServerProcess`, closes stdin on exit,
then escalates to SIGTERM and SIGKILL of the whole group, so no process
(worker processes included) outlives a benchmark run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import anyio

READY_PREFIX = "LISTENING "
ROOT = Path(__file__).resolve().parent.parent


class ServerFailed(RuntimeError):
    """A benchmark server did not start (its stderr tail is in the message)."""


class ServerProcess:
    """``with ServerProcess("benchmarks.bare_echo") as server: server.endpoint``."""

    def __init__(self, module: str, *args: str, start_timeout: float = 60.0) -> None:
        self.module = module
        self.args = args
        self.start_timeout = start_timeout
        self.endpoint = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        try:
            self.endpoint = self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _wait_ready(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        lines: queue.Queue[bytes] = queue.Queue()
        stdout = self.proc.stdout

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(b"")

        threading.Thread(target=pump, daemon=True, name=f"{self.module} stdout").start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerFailed(
                    f"{self.module} did not report LISTENING within {self.start_timeout:.0f}s"
                    + self._stderr_tail()
                )
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if not line:
                self.proc.wait(timeout=5)
                raise ServerFailed(
                    f"{self.module} exited with code {self.proc.returncode} before serving"
                    + self._stderr_tail()
                )
            text = line.decode(errors="replace").strip()
            if text.startswith(READY_PREFIX):
                return text[len(READY_PREFIX) :]

    def _stderr_tail(self, lines: int = 20) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace").strip().splitlines()[-lines:]
        return ("\n--- stderr ---\n" + "\n".join(tail)) if tail else ""

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def _stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        for signum, wait in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if signum is not None:
                self._signal_group(signum)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break
        # Workers the server started live in its process group; make sure none
        # is left even when the server itself exited first.
        self._signal_group(signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self.proc = None


# -- the child side -----------------------------------------------------------


def event_loop_options() -> dict[str, Any]:
    """anyio backend options: uvloop when installed (as ``anyserve start`` does)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def announce(endpoint: str) -> None:
    """Tell the parent where the server listens."""
    sys.stdout.write(f"{READY_PREFIX}{endpoint}\n")
    sys.stdout.flush()


async def wait_for_exit() -> None:
    """Return when stdin reaches end of file or SIGTERM/SIGINT arrives."""
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()
    fd = sys.stdin.fileno()

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            closed.set()

    loop.add_reader(fd, on_readable)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, closed.set)
    try:
        await closed.wait()
    finally:
        loop.remove_reader(fd)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run_child(main: Any) -> None:
    """Run an async ``main()`` of a server process on the same loop as replicas."""
    anyio.run(main, backend_options=event_loop_options())
