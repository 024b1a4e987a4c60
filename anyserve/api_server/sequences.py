"""Sequence and session affinity: which replica a stateful conversation is on.

Two kinds of requests stay on one replica:

* **Triton sequences**: a request whose parameters carry ``sequence_id`` (int
  or string; :mod:`anyserve.sequence`). The first request (``sequence_start``)
  picks a replica the usual way; every later one goes to the same replica
  *after the previous one has been answered*, in arrival order (an
  ``asyncio.Lock`` per sequence, whose waiters are served first in, first
  out), so even requests pipelined on one gRPC stream run and answer in order.
  A request that is not a start of a sequence this server does not know is
  refused, as Triton does. When the replica left (unregistered, expired, or
  unreachable) the sequence fails with Unavailable naming it; it does not
  move, since its state is gone, until a new ``sequence_start``.
  ``sequence_end`` ends the entry.
* **Sessions**: an HTTP request with an ``X-Session-Id`` header goes to the
  replica the session's first request went to (an LLM server keeps the
  conversation's cache there). No ordering: requests of a session may run
  concurrently. When that replica left, the session moves to another.

Entries not used for ``idle_timeout`` seconds (``--sequence-idle-timeout``)
are dropped. Keys include how the request addressed its target (model name or
capability query), so two models' sequence 1 are two sequences.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field

from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry, ReplicaEntry
from anyserve.errors import InvalidArgument, Unavailable
from anyserve.sequence import SEQUENCE_MARK, IdleTable, SequenceFlags, peek_request

#: Seconds a sequence or session may go without a request before it is forgotten.
DEFAULT_IDLE_TIMEOUT = 60.0
#: HTTP header naming a session (replica affinity without ordering).
SESSION_HEADER = "x-session-id"
# Longest session id accepted (it is a table key).
_MAX_SESSION = 256

# What a request with neither sequence nor session routes within (stateless,
# so one serves every request; nullcontext supports ``async with``).
_UNPINNED: AbstractAsyncContextManager[None] = nullcontext()
# Requests up to this size are searched for SEQUENCE_MARK before being parsed.
_SEARCHED = 64 * 1024


@dataclass(eq=False)
class Pin:
    """Where the router must send one request: ``replica_id`` (None: choose,
    then :meth:`chose` records it). ``lost`` is the error when that replica
    is gone; ``strict`` False (sessions) lets the request move instead."""

    what: str
    replica_id: str | None = None
    strict: bool = True

    def replica(self, registry: Registry, unreachable: list[ReplicaEntry]) -> ReplicaEntry | None:
        """The pinned replica, or None to choose one. Raises :meth:`lost` when
        a strict pin's replica is gone or unreachable; a session's pin moves."""
        if self.replica_id is None:
            return None
        found = registry.get(self.replica_id)
        if found is not None and found not in unreachable:
            return found
        if self.strict:
            raise self.lost()
        self.replica_id = None
        return None

    def chose(self, replica: ReplicaEntry) -> None:
        """The router picked ``replica`` for an unpinned request."""
        self.replica_id = replica.replica_id

    def lost(self) -> Unavailable:
        """The error for a request whose replica has gone."""
        return Unavailable(
            f"{self.what} was served by replica {self.replica_id}, which is gone (unregistered"
            " or unreachable); its state went with it. Start it again (sequence_start)"
        )


@dataclass(eq=False)
class _Entry:
    pin: Pin
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    last_used: float = 0.0


class Sequences:
    """The sequence/session -> replica table of one API server."""

    def __init__(
        self,
        registry: Registry,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("the sequence idle timeout must be positive")
        self.registry = registry
        self._entries: IdleTable[tuple[str, str, str], _Entry] = IdleTable(idle_timeout, clock)

    def __len__(self) -> int:
        return len(self._entries)

    def route(
        self, payload: bytes, meta: RequestMeta, session: str | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Pin one request (``meta.pin``, which the router follows) for the
        block; the next request of its sequence waits until the block ends.

        Raises InvalidArgument for malformed sequence parameters (when
        called), a session id too long, or a continued sequence this server
        does not know, and Unavailable when the sequence's replica has gone
        (when the block is entered).
        """
        # Sequence parameters are map keys "sequence_..." in the bytes: a small
        # request without the word has none, and is not parsed here. A large
        # one is walked instead: the walk skips its tensors, where a search
        # reads every byte (~0.4 ms per MiB).
        if len(payload) > _SEARCHED or SEQUENCE_MARK in payload:
            seq = peek_request(payload)[2]
        else:
            seq = None
        if seq is None and not session:
            return _UNPINNED  # most requests: no generator-based context per request
        return self._route(meta, seq, session)

    @asynccontextmanager
    async def _route(
        self, meta: RequestMeta, seq: SequenceFlags | None, session: str | None
    ) -> AsyncIterator[None]:
        if seq is not None:
            async with self._sequence(meta, seq) as meta.pin:
                yield
        elif session:
            if len(session) > _MAX_SESSION or not session.isprintable():
                raise InvalidArgument(
                    f"X-Session-Id must be printable and at most {_MAX_SESSION} characters"
                )
            meta.pin = self._session(meta, session)
            yield
        else:
            yield

    @asynccontextmanager
    async def _sequence(self, meta: RequestMeta, seq: SequenceFlags) -> AsyncIterator[Pin]:
        key = ("sequence", meta.describe(), repr(seq.id))
        what = f"sequence {seq.describe()} of {meta.describe()}"
        entry = self._entries.take(key, lambda: _Entry(Pin(what)))
        try:
            async with entry.lock:
                pin = entry.pin
                if seq.start:
                    pin.replica_id = None  # a new sequence: choose afresh
                elif pin.replica_id is None:
                    raise InvalidArgument(
                        f"inference request for {what} must specify the START flag on the"
                        " first request of the sequence (sequence_start)"
                    )
                yield pin
        finally:
            self._entries.release(key, entry, end=seq.end)

    def _session(self, meta: RequestMeta, session: str) -> Pin:
        key = ("session", meta.describe(), session)
        what = f"session {session!r} of {meta.describe()}"
        entry = self._entries.take(key, lambda: _Entry(Pin(what, strict=False)))
        pin = entry.pin
        if pin.replica_id is not None and self.registry.get(pin.replica_id) is None:
            pin.replica_id = None  # its replica left: the session moves
        self._entries.release(key, entry, end=False)  # a session is not held
        return pin
