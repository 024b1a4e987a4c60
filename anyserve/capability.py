"""Capabilities: sets of string key-value pairs, and how queries match them.

A capability such as ``type=chat, model=llama-70b`` is what a handler serves. A
query (from ``X-Capability-*`` headers or ``x-capability-*`` gRPC metadata) matches
a capability when every key of the query is present with the same value. Of
several matches the closest wins: the one with the fewest keys beyond the query.
Keys are lower-case with ``_`` for ``-``; values are compared as strings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from anyserve.errors import InvalidArgument

HEADER_PREFIX = "x-capability-"


def normalise_key(key: str) -> str:
    """``Foo-Bar`` -> ``foo_bar``; raises InvalidArgument on an empty key."""
    norm = key.strip().lower().replace("-", "_")
    if not norm:
        raise InvalidArgument("empty capability key")
    return norm


class Capability(Mapping[str, str]):
    """An immutable, hashable set of capability key-value pairs.

    Values given as numbers or booleans are stored as their string form
    (``True`` -> ``"true"``), so ``model=7`` in code matches a header ``7``.
    This leniency serves registration JSON and clients; ``@app.capability``
    takes only str and int values (:mod:`anyserve.handler_options`).
    """

    __slots__ = ("_hash", "_items")

    def __init__(self, items: Mapping[str, Any] | None = None, /, **kwargs: Any) -> None:
        merged: dict[str, str] = {}
        for source in (items or {}, kwargs):
            for key, value in source.items():
                merged[normalise_key(str(key))] = _to_str(value)
        self._items = dict(sorted(merged.items()))
        self._hash = hash(tuple(self._items.items()))

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Capability):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Capability({self})"

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._items.items())

    def to_dict(self) -> dict[str, str]:
        """A plain dict copy (what goes into registration JSON)."""
        return dict(self._items)

    def matches(self, query: Mapping[str, str]) -> bool:
        """True when every key of ``query`` is here with the same value."""
        # A view's subset test runs in C: this is on every request's path.
        return query.items() <= self._items.items()

    def extra_keys(self, query: Mapping[str, str]) -> int:
        """How many keys this capability has beyond ``query`` (lower is closer)."""
        return len(self._items) - len(query)

    def serves_name(self, name: str) -> int:
        """How well this capability answers to a KServe model name.

        Returns 2 when ``model`` equals the name, 1 when there is no match by
        model but ``type`` equals it, 0 otherwise.
        """
        if self._items.get("model") == name:
            return 2
        if self._items.get("type") == name:
            return 1
        return 0

    @property
    def name(self) -> str:
        """The KServe model name this capability answers to: ``model``, else ``type``."""
        return self._items.get("model") or self._items.get("type") or str(self)

    @classmethod
    def parse(cls, text: str) -> Capability:
        """Parse ``type=chat,model=demo`` (the CLI form); raises InvalidArgument."""
        items: dict[str, str] = {}
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise InvalidArgument(f"capability {text!r}: expected key=value, got {part!r}")
            items[key] = value.strip()
        if not items:
            raise InvalidArgument(f"capability {text!r} is empty")
        return cls(items)


def _to_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def query_from_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Extract the capability query from HTTP headers or gRPC metadata pairs.

    ``X-Capability-Foo-Bar: 1`` (any case) becomes ``{"foo_bar": "1"}``.
    """
    query: dict[str, str] = {}
    for key, value in headers:
        lower = key.lower()
        if lower.startswith(HEADER_PREFIX):
            query[normalise_key(lower[len(HEADER_PREFIX) :])] = value.strip()
    return query


def query_to_metadata(query: Mapping[str, str]) -> list[tuple[str, str]]:
    """The inverse of :func:`query_from_headers`, as gRPC metadata pairs."""
    return [(HEADER_PREFIX + k.replace("_", "-"), v) for k, v in query.items()]


#: How well a capability answers a request: lower is better (see :func:`rank`).
Rank = tuple[int, int]


def rank(cap: Capability, query: Mapping[str, str], name: str = "") -> Rank | None:
    """How well ``cap`` answers a request, or None when it does not match.

    With a capability ``query`` (headers win over a name): the query must be a
    subset of ``cap``; closer is fewer keys beyond the query. Without one, the
    KServe model ``name`` addresses ``cap`` by its ``model`` value, else its
    ``type`` value; a ``model`` match beats a ``type`` match, then fewer keys
    win. This is the one ranking used by the API server's registry, the
    replica's dispatcher and the admin service.
    """
    if query:
        return (0, len(cap) - len(query)) if cap.matches(query) else None
    score = cap.serves_name(name) if name else 0
    return (2 - score, len(cap)) if score else None
