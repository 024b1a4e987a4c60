"""What a request carries through the API server besides its body.

HTTP headers and gRPC metadata use the same lower-case names (``anyserve.rpc``),
so both entries build a :class:`RequestMeta` from ``(key, value)`` pairs with
:func:`parse_meta`, and the router turns it back into replica metadata with
:meth:`RequestMeta.metadata`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from anyserve import rpc
from anyserve.capability import HEADER_PREFIX, Capability, normalise_key, query_to_metadata
from anyserve.errors import InvalidArgument

if TYPE_CHECKING:
    from anyserve.api_server.sequences import Pin

_MAX_ID = 128
# Longest deadline a client may ask for (a day): beyond that it is a mistake.
MAX_TIMEOUT = 86400.0
# What a request may carry to the next hop: capability keys, and the length of
# the hop list and call chain. Larger is a malformed request (400), not load.
_MAX_QUERY_KEYS = 64
_MAX_TEXT = 4096


# Request ids this process makes up: 32 hex digits like a uuid4's, a random
# prefix per process and a counter (a tenth of uuid4's cost, as unique here).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
# The headers (metadata keys) parse_meta reads besides the capability query.
_FIELDS = frozenset({rpc.REQUEST_ID, rpc.DELEGATED_FROM, rpc.VISITED, rpc.CALL_CHAIN})
_PREFIX_LEN = len(HEADER_PREFIX)
# Parsed headers by their exact pairs (see parse_meta): at most this many,
# each of pairs at most _CACHED_TEXT characters long in all.
_CACHE_SIZE = 128
_CACHED_TEXT = 1024


@dataclass(slots=True)
class RequestMeta:
    """Routing facts of one request.

    ``query`` is the capability query (may be empty, then ``model_name`` routes);
    ``visited`` is only filled for delegated requests (``delegated_from`` set) and
    always contains the delegating replica: its length is the hop count.
    """

    query: Mapping[str, str]
    model_name: str
    request_id: str
    timeout: float
    delegated_from: str = ""
    visited: tuple[str, ...] = ()
    call_chain: str = ""
    # What routing learnt, for metrics and the access log (anyserve.metrics):
    # the chosen replica's capability that serves the request (None: no replica
    # chosen, or a random pick), its id, and the responses a stream relayed.
    capability: Capability | None = None
    replica_id: str = ""
    chunks: int = 0
    # The replica a Triton sequence or session is on (api_server/sequences.py).
    pin: Pin | None = None
    # Set when the request's tensors are in shared memory on this host
    # (anyserve.shm.host_id): only replicas there may take it.
    host: str = ""
    # The query as replica metadata, when parse_meta has it ready.
    query_metadata: tuple[tuple[str, str], ...] | None = None

    def describe(self) -> str:
        """How the request addressed its target, for error messages and logs."""
        if self.query:
            return "capability " + ",".join(f"{k}={v}" for k, v in sorted(self.query.items()))
        return f"model {self.model_name!r}"

    def metadata(self) -> list[tuple[str, str]]:
        """gRPC metadata for the replica (the query, request id and hop list)."""
        q = self.query_metadata
        md = query_to_metadata(self.query) if q is None else list(q)
        md.append((rpc.REQUEST_ID, self.request_id))
        if self.delegated_from:
            md.append((rpc.DELEGATED_FROM, self.delegated_from))
            md.append((rpc.VISITED, ",".join(self.visited)))
        if self.call_chain:
            md.append((rpc.CALL_CHAIN, self.call_chain))
        return md


def _check_value(key: str, value: str) -> str:
    # gRPC rejects non-printable or non-ASCII metadata values; say so as a 400
    # here rather than failing later inside the channel.
    if not (value.isascii() and value.isprintable()):
        raise InvalidArgument(f"header {key!r} must be printable ASCII")
    return value


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What parse_meta reads from a set of pairs (``request_id``: "" when
    none was given, then one is made up per request)."""

    query: Mapping[str, str]
    query_metadata: tuple[tuple[str, str], ...]
    request_id: str
    delegated_from: str
    visited: tuple[str, ...]
    call_chain: str


# Clients send the same few headers with every request: each distinct set is
# parsed once. Shared by every request that sent it, so never mutated (the
# query is a Mapping to everyone else).
_parsed: dict[tuple[tuple[str, str | bytes], ...], _Parsed] = {}


def parse_meta(
    pairs: Iterable[tuple[str, str | bytes]], *, model_name: str, timeout: float
) -> RequestMeta:
    """Build the routing facts from headers or metadata.

    Raises InvalidArgument for a malformed capability key or non-ASCII value.
    A client cannot raise the hop limit through headers: the hop count is the
    length of the visited list, which only grows.
    """
    key = pairs if type(pairs) is tuple else tuple(pairs)
    parsed = _parsed.get(key)
    if parsed is None:
        parsed, size = _parse(key)
        # A request id is per request (no hit to wait for); long sets are rare.
        if not parsed.request_id and size <= _CACHED_TEXT:
            if len(_parsed) >= _CACHE_SIZE:
                _parsed.clear()
            _parsed[key] = parsed
    return RequestMeta(
        query=parsed.query,
        model_name=model_name,
        request_id=parsed.request_id or f"{_ID_PREFIX}{next(_ID_COUNTER):016x}",
        timeout=timeout,
        delegated_from=parsed.delegated_from,
        visited=parsed.visited,
        call_chain=parsed.call_chain,
        query_metadata=parsed.query_metadata,
    )


def _parse(pairs: tuple[tuple[str, str | bytes], ...]) -> tuple[_Parsed, int]:
    """The pairs read, and their length in characters; raises InvalidArgument."""
    # One pass for the query (what capability.query_from_headers reads) and
    # the other fields.
    query: dict[str, str] = {}
    fields: dict[str, str] = {}
    size = 0
    for key, value in pairs:
        size += len(key) + len(value)
        if isinstance(value, bytes):  # "-bin" gRPC metadata; never ours
            continue
        key = key.lower()
        if key.startswith(HEADER_PREFIX):
            query[normalise_key(key[_PREFIX_LEN:])] = value.strip()
        if key in _FIELDS:
            fields[key] = value.strip()
    for key, value in query.items():
        _check_value(key, value)
    if query and (
        len(query) > _MAX_QUERY_KEYS or sum([len(k) + len(v) for k, v in query.items()]) > _MAX_TEXT
    ):
        raise InvalidArgument(
            f"capability headers too large: at most {_MAX_QUERY_KEYS} keys"
            f" and {_MAX_TEXT} bytes in all"
        )
    if fields:
        for key in (rpc.VISITED, rpc.CALL_CHAIN):
            if len(fields.get(key, "")) > _MAX_TEXT:
                raise InvalidArgument(f"header {key!r} is longer than {_MAX_TEXT} bytes")
    request_id = fields.get(rpc.REQUEST_ID, "")
    if not (0 < len(request_id) <= _MAX_ID and request_id.isascii() and request_id.isprintable()):
        request_id = ""
    delegated_from = fields.get(rpc.DELEGATED_FROM, "")
    visited: tuple[str, ...] = ()
    if delegated_from:
        _check_value(rpc.DELEGATED_FROM, delegated_from)
        hops = [
            h.strip() for h in _check_value(rpc.VISITED, fields.get(rpc.VISITED, "")).split(",")
        ]
        listed = [h for h in hops if h]
        if delegated_from not in listed:
            listed.append(delegated_from)
        visited = tuple(listed)
    call_chain = fields.get(rpc.CALL_CHAIN, "")
    if call_chain:
        _check_value(rpc.CALL_CHAIN, call_chain)
    parsed = _Parsed(
        query=query,
        query_metadata=tuple(query_to_metadata(query)),
        request_id=request_id,
        delegated_from=delegated_from,
        visited=visited,
        call_chain=call_chain,
    )
    return parsed, size


def http_timeout(value: str | None, default: float) -> float:
    """Seconds from an ``X-Request-Timeout`` header, else ``default``.

    Raises InvalidArgument unless the value is a positive number of at most
    :data:`MAX_TIMEOUT` seconds.
    """
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidArgument(f"X-Request-Timeout must be seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidArgument(f"X-Request-Timeout must be positive, got {value!r}")
    if seconds > MAX_TIMEOUT:
        raise InvalidArgument(
            f"X-Request-Timeout must be at most {MAX_TIMEOUT:.0f} seconds, got {value!r}"
        )
    return seconds
