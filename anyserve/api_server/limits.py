"""Limits of the HTTP edge: read timeouts, a connection cap and a gate for big bodies.

:class:`EdgeLimits` holds the settings (``api-server`` flags
``--header-timeout``, ``--body-timeout``, ``--keepalive-timeout``,
``--max-connections``); :class:`BigBodyGate` bounds how many big request
JSON bodies are parsed at once, so that a burst of them costs waiting clients
a 429, not the server its memory. The connection side is in
:mod:`anyserve.api_server.connections`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from anyserve.errors import Overloaded

logger = logging.getLogger("anyserve.api_server")

__all__ = ["BigBodyGate", "EdgeLimits", "connection_budget", "raise_open_file_limit"]

#: Descriptors kept for everything but client connections (replica channels,
#: the gRPC entry, logs, worker pipes of an embedding program).
FD_RESERVE = 128


@dataclass(frozen=True)
class EdgeLimits:
    """Timeouts and caps of the HTTP listener.

    ``header_timeout``: seconds for a request line and headers to arrive,
    counted from the connection or the previous response (else the connection
    is closed without an answer). ``body_timeout``: seconds a request body may
    go without a byte while the server waits for it (then 408 and close).
    ``keepalive_timeout``: seconds an idle keep-alive connection is kept.
    ``max_connections``: open HTTP connections at most; a new one beyond it
    evicts the oldest connection that has no request in progress (idle or
    still sending headers), or is answered 503 at once when every one is
    busy. ``big_body``: bytes above which a body (or one with no
    Content-Length) is read into one buffer and, when JSON, parsed in pieces
    once it holds a slot of the big-body gate (``big_body_slots`` parses at
    once); one that waits ``big_body_wait`` seconds for a slot is answered
    429 with Retry-After. Raises ValueError for a setting out of range.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 5.0
    max_connections: int = 1000
    big_body: int = 1024 * 1024
    big_body_slots: int = 2
    big_body_wait: float = 10.0

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keepalive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_connections < 1 or self.big_body_slots < 1:
            raise ValueError("max_connections and big_body_slots must be at least 1")
        if self.big_body < 0 or self.big_body_wait < 0:
            raise ValueError("big_body and big_body_wait must not be negative")


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (what servers
    usually do: the soft default, often 1024, is below what a busy listener
    needs) and return the soft limit now in force. Never raises: a platform
    that refuses keeps its limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit to %d: %s", hard, exc)
    return soft


def connection_budget(wanted: int) -> int:
    """``wanted`` connections, or fewer when the open-file limit would not
    leave :data:`FD_RESERVE` descriptors for the rest of the server (logged)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = max(1, soft - FD_RESERVE)
    if wanted > room:
        logger.warning(
            "--max-connections %d lowered to %d: the open-file limit is %d", wanted, room, soft
        )
        return room
    return wanted


class BigBodyGate:
    """At most ``limits.big_body_slots`` big JSON bodies parsed at once.

    A small body (declared length at most ``limits.big_body``) passes without
    waiting or any scheduling: the request path stays as lean as before.
    """

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.big_body_slots)

    def is_big(self, declared: int | None) -> bool:
        """Whether a body of ``declared`` bytes (None: unknown, chunked) needs a slot."""
        return declared is None or declared > self.limits.big_body

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the block. Raises Overloaded (429, Retry-After)
        when none frees up within ``big_body_wait`` seconds."""
        try:
            # Semaphore.acquire hands a wake-up on when cancelled: no slot leaks.
            async with asyncio.timeout(self.limits.big_body_wait):
                await self._slots.acquire()
        except TimeoutError:
            raise Overloaded(
                f"too many large request bodies in progress ({self.limits.big_body_slots});"
                " retry shortly",
                retry_after=1.0,
            ) from None
        try:
            yield
        finally:
            self._slots.release()
