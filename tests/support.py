"""What every test module shares: reading Server-Sent Events, polling with a
deadline, and a free local port.

* :func:`sse_events` / :func:`timed_sse_events` read an HTTP response's SSE
  events as they arrive; :func:`parse_sse` reads a whole SSE body (curl's
  output). All three use the one parser, :class:`SseParser`.
* :func:`eventually` waits for a condition that lives elsewhere (another
  process, a server in the same event loop, a file a worker writes) where no
  event can be awaited. Readiness is always polled with a deadline, never
  assumed after a fixed sleep.

Why :func:`eventually` and not ``anyserve.testing.wait_until``: that one is the
public pytest plugin's helper and polls a *sync* predicate (it calls it and
tests the result, so an async predicate's coroutine would count as true at
once), and it fails with a bare ``TimeoutError``. The tests here poll as many
async conditions (``/registry`` over HTTP, a gRPC admin call) as sync ones and
want the failure to say what was awaited, so they all use :func:`eventually`,
for both kinds. It raises ``TimeoutError`` too, so ``pytest.raises(TimeoutError)``
keeps meaning "it did not happen in time" for either helper.
"""

from __future__ import annotations

import inspect
import socket
import time
from collections.abc import AsyncGenerator, Callable

import anyio
import httpx

# --------------------------------------------------------------------------- SSE


class SseParser:
    """An incremental Server-Sent Events parser: feed it lines, get events.

    Follows the SSE rules the tests rely on: ``event:`` names the event
    (``message`` when absent), ``data:`` lines are joined with newlines, one
    space after the colon is dropped, ``:`` lines are comments (keep-alives),
    and a blank line ends an event, which is only dispatched if it had data.
    """

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """Take one line (without its line ending); return ``(event, data)``
        when the line completes an event, else None."""
        if not line:
            found = (self._event, "\n".join(self._data)) if self._data else None
            self._event, self._data = "message", []
            return found
        if not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                self._event = value
            elif name == "data":
                self._data.append(value)
        return None


async def sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str, str], None]:
    """``(event, data)`` of each SSE event of a streamed response, as the lines
    arrive (so a test can see the first event before the stream ends)."""
    parser = SseParser()
    async for line in response.aiter_lines():
        if (found := parser.feed(line)) is not None:
            yield found


async def timed_sse_events(
    response: httpx.Response,
) -> AsyncGenerator[tuple[str, str, float], None]:
    """Like :func:`sse_events`, with the seconds from the first read until each
    event arrived: ``(event, data, seconds)``."""
    parser, start = SseParser(), time.monotonic()
    async for line in response.aiter_lines():
        if (found := parser.feed(line)) is not None:
            yield *found, time.monotonic() - start


def parse_sse(body: str) -> list[tuple[str, str]]:
    """``(event, data)`` of every complete event in a whole SSE body."""
    parser = SseParser()
    found = (parser.feed(line) for line in body.splitlines())
    return [event for event in found if event is not None]


# --------------------------------------------------------------------------- polling


async def eventually(
    check: Callable[[], object],
    timeout: float = 10.0,
    *,
    interval: float = 0.02,
    what: str | None = None,
) -> float:
    """Poll ``check()`` until it returns something true; return the seconds it took.

    ``check`` may be a plain function or an async one (its result is awaited).
    Exceptions it raises (a failed ``assert`` about a crashed process, say)
    propagate at once. After ``timeout`` seconds it raises ``TimeoutError``
    naming what was awaited: ``what`` if given, else the check's name (the
    source line for a lambda).
    """
    start = anyio.current_time()
    with anyio.move_on_after(timeout):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return anyio.current_time() - start
            await anyio.sleep(interval)
    raise TimeoutError(f"not true within {timeout}s: {what or _describe(check)}")


def _describe(check: Callable[[], object]) -> str:
    """A readable name for a polled condition."""
    owner = getattr(check, "__self__", None)
    name = getattr(check, "__name__", repr(check))
    if owner is not None:
        return f"{owner!r}.{name}()"
    if name == "<lambda>":
        try:
            return inspect.getsource(check).strip()
        except (OSError, TypeError):
            return repr(check)
    return f"{name}()"


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
