"""Triton's sequence parameters, read from a serialized ``ModelInferRequest``.

A request belongs to a stateful sequence when its ``parameters`` hold a
``sequence_id`` (a non-zero int or a non-empty string); ``sequence_start`` and
``sequence_end`` (bools) mark its first and last request. The API server and
the replica route and order on these without parsing the request (its tensors
may be large): :func:`peek_request` walks the top-level fields and decodes only
the model name and version, and the parameter entries when one may be a
sequence parameter.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from anyserve.errors import InvalidArgument
from anyserve.rpc import message_fields, peek_fields

SEQUENCE_ID = "sequence_id"
SEQUENCE_START = "sequence_start"
SEQUENCE_END = "sequence_end"

# What the keys SEQUENCE_ID, _START and _END all begin with: a parameter
# entry without it is none of them.
SEQUENCE_MARK = b"sequence_"

# ModelInferRequest fields and InferParameter's oneof members.
_MODEL_NAME, _MODEL_VERSION, _PARAMETERS = 1, 2, 4
_PEEKED = (_MODEL_NAME, _MODEL_VERSION, _PARAMETERS)  # the only fields copied out
# Parameter entries longer than this are not sequence parameters (not read).
_MAX_ENTRY = 4096
_BOOL, _INT64, _STRING, _UINT64 = 1, 2, 3, 5


@dataclass(frozen=True, slots=True)
class SequenceFlags:
    """The sequence of one request: ``id`` (int or str, never 0 or ""), and
    whether the request starts and/or ends it."""

    id: int | str
    start: bool = False
    end: bool = False

    def describe(self) -> str:
        """The id as Triton prints it (strings quoted)."""
        return repr(self.id) if isinstance(self.id, str) else str(self.id)


def _parameter(entry: bytes) -> tuple[str, int | str | None]:
    """A ``parameters`` map entry: ``(key, value)``; value None unless bool,
    int or string."""
    key = ""
    value_: int | str | None = None
    for number, _, raw in message_fields(entry):
        if number == 1 and isinstance(raw, bytes):
            key = raw.decode("utf-8", "replace")
        elif number == 2 and isinstance(raw, bytes):
            for member, kind, inner in message_fields(raw):
                if member in (_BOOL, _INT64, _UINT64) and kind == 0 and isinstance(inner, int):
                    # int64 travels as two's complement in 64 bits.
                    signed = member == _INT64 and inner >= 1 << 63
                    value_ = inner - (1 << 64) if signed else inner
                elif member == _STRING and isinstance(inner, bytes):
                    value_ = inner.decode("utf-8", "replace")
    return key, value_


def peek_request(payload: bytes | memoryview) -> tuple[str, str, SequenceFlags | None]:
    """``(model_name, model_version, sequence or None)`` of a serialized
    ModelInferRequest, in one walk over its top-level fields. Its parameters
    are decoded only when one holds :data:`SEQUENCE_MARK` (most requests have
    none, and a replica routes every request by this).

    Raises InvalidArgument for malformed bytes, a ``sequence_id`` that is
    neither an int nor a string, or start/end flags without an id.
    """
    name: bytes | memoryview = b""
    version: bytes | memoryview = b""
    entries: list[bytes] = []
    try:
        # A longer parameter entry is no sequence parameter: skipped, uncopied.
        for number, raw in peek_fields(payload, _PEEKED, _MAX_ENTRY):
            if number == _MODEL_NAME:
                name = raw
            elif number == _MODEL_VERSION:
                version = raw
            elif len(raw) <= _MAX_ENTRY:
                entries.append(bytes(raw))  # the same object when raw is bytes
        seq = None
        if entries and any(SEQUENCE_MARK in entry for entry in entries):
            seq = _sequence(entries)
    except ValueError as exc:
        raise InvalidArgument(f"malformed ModelInferRequest: {exc}") from None
    return str(name, "utf-8", "replace"), str(version, "utf-8", "replace"), seq


def _sequence(entries: list[bytes]) -> SequenceFlags | None:
    """The sequence the ``parameters`` map entries name, or None; raises
    InvalidArgument (ValueError for malformed bytes) as :func:`peek_request`."""
    params = dict[str, int | str | None]()
    for entry in entries:
        key, value = _parameter(entry)
        if key in (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END):
            params[key] = value
    if not params:
        return None
    seq_id = params.get(SEQUENCE_ID)
    if seq_id is None or seq_id == 0 or seq_id == "":
        if params.get(SEQUENCE_START) or params.get(SEQUENCE_END):
            raise InvalidArgument(
                "sequence_start/sequence_end need a non-zero (or non-empty) sequence_id"
            )
        return None
    return SequenceFlags(seq_id, bool(params.get(SEQUENCE_START)), bool(params.get(SEQUENCE_END)))


def from_parameters(parameters: object) -> SequenceFlags | None:
    """The sequence of a parsed request's ``parameters`` map (the worker's
    view), or None."""
    get = getattr(parameters, "get", None)
    if get is None:
        return None
    param = get(SEQUENCE_ID)
    if param is None:
        return None
    kind = param.WhichOneof("parameter_choice")
    seq_id: int | str = getattr(param, kind) if kind else 0
    if isinstance(seq_id, bool) or seq_id in (0, ""):
        return None

    def flag(name: str) -> bool:
        found = get(name)
        return bool(found is not None and found.bool_param)

    return SequenceFlags(seq_id, flag(SEQUENCE_START), flag(SEQUENCE_END))


class SequenceContext:
    """``context.sequence`` of a request that belongs to a sequence: its
    ``id``, whether this request ``start``s or ``end``s it, and ``state``, a
    dict the handler may fill, the same object for every request of the
    sequence (they run one at a time, in order, in one worker) until the
    sequence ends or goes idle past the timeout."""

    __slots__ = ("end", "id", "start", "state")

    def __init__(self, flags: SequenceFlags, state: dict[str, Any]) -> None:
        self.id = flags.id
        self.start = flags.start
        self.end = flags.end
        self.state = state

    def __repr__(self) -> str:
        return f"SequenceContext(id={self.id!r}, start={self.start}, end={self.end})"


class SequenceStates:
    """The ``state`` dicts of the sequences one worker holds: created by a
    sequence's first request (or its ``start``, which begins afresh), dropped
    after its ``end`` or ``idle_timeout`` seconds without a request."""

    def __init__(
        self, idle_timeout: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        # Least recently used first.
        self._states: OrderedDict[int | str, dict[str, Any]] = OrderedDict()
        self._used: dict[int | str, float] = {}

    def __len__(self) -> int:
        return len(self._states)

    def open(self, parameters: object) -> SequenceContext | None:
        """The ``context.sequence`` of a request (None outside a sequence)."""
        flags = from_parameters(parameters)
        if flags is None:
            return None
        now = self._clock()
        while self._states:
            oldest = next(iter(self._states))
            if now - self._used[oldest] <= self.idle_timeout:
                break
            del self._states[oldest], self._used[oldest]
        state = None if flags.start else self._states.get(flags.id)
        if state is None:
            state = self._states[flags.id] = {}
        self._states.move_to_end(flags.id)
        self._used[flags.id] = now
        return SequenceContext(flags, state)

    def close(self, sequence: SequenceContext | None) -> None:
        """The request ended: forget the sequence if it was its last."""
        if sequence is None:
            return
        self._used[sequence.id] = self._clock()
        if sequence.end and self._states.get(sequence.id) is sequence.state:
            del self._states[sequence.id], self._used[sequence.id]


class Idle(Protocol):
    """What :class:`IdleTable` keeps of an entry: who holds it, and when it was last used."""

    users: int
    last_used: float


K = TypeVar("K", bound=Hashable)
E = TypeVar("E", bound=Idle)


class IdleTable(Generic[K, E]):
    """Entries by key (sequences, sessions), least recently used first.

    An entry goes when its last holder leaves after the sequence's end, or
    when nobody has held it for ``idle_timeout`` seconds (checked on each
    :meth:`take`, oldest first: expiry stops at the first live entry). The
    API server's sequence -> replica table and the replica's sequence ->
    worker table are both one of these.
    """

    def __init__(self, idle_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._entries: OrderedDict[K, E] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, key: K, new: Callable[[], E]) -> E:
        """The entry of ``key`` (``new()`` when there is none) with one more
        holder; give it back with :meth:`release`."""
        cutoff = self._clock() - self.idle_timeout
        while self._entries:
            oldest, entry = next(iter(self._entries.items()))
            if entry.users or entry.last_used > cutoff:
                break
            del self._entries[oldest]
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = new()
        found.users += 1
        return found

    def release(self, key: K, entry: E, *, end: bool) -> None:
        """One holder of ``entry`` is done (``end``: the sequence ended)."""
        entry.users -= 1
        entry.last_used = self._clock()
        if self._entries.get(key) is not entry:
            return  # dropped meanwhile (expired, or replaced by a new start)
        if end and entry.users == 0:
            del self._entries[key]
        else:
            self._entries.move_to_end(key)
