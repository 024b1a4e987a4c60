"""The in-memory registry of replicas and how a request picks among them.

Matching (:func:`anyserve.capability.rank`): a capability query matches a capability when
every key of the query is present with the same value. Candidates are ranked
closest match first (fewest keys beyond the query), then loaded before
loadable (no cold start), then fewest in-flight requests, ties at random.
Without a query a KServe model name addresses capabilities by their ``model``
value, else their ``type`` value.

Entries expire when their last heartbeat is older than the TTL: the server's
sweeper calls :meth:`Registry.expire`, and lookups skip stale entries in the
meantime so a dead replica is never chosen between sweeps.

This is one API server's *view*, the only thing the router reads. Where the
registrations are shared beyond it is a :class:`~anyserve.api_server.
registry_backend.RegistryBackend` (in memory only, or Redis), which keeps
this view in step.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from anyserve.capability import Capability, rank

# Rank of a replica for one request: lower is better.
Rank = tuple[int, ...]
# What serving() looks a request up by: its query's pairs and model name.
Key = tuple[tuple[tuple[str, str], ...], str]
# Rankings kept at once (Registry.serving): at most this many queries, and
# this many replicas listed in all. A client asking for ever new queries (or
# the same pairs in ever new orders) makes the registry rank again, not grow.
_RANKED_QUERIES = 256
_RANKED_REPLICAS = 16384
# A model name comes from the request's bytes, of any length: one longer than
# this is ranked for its request alone, not kept (the query is bounded by
# meta.parse_meta already).
_RANKED_NAME = 1024


@dataclass(eq=False, slots=True)
class ReplicaEntry:
    """One registered replica. ``in_flight`` is maintained by the router."""

    replica_id: str
    endpoint: str
    capabilities: tuple[Capability, ...]
    loadable: tuple[Capability, ...] = ()
    # Served here but down (its workers crash-looped): never routed to, but a
    # request for it is told it is unavailable rather than unknown.
    failed: tuple[Capability, ...] = ()
    workers: list[Any] = field(default_factory=list)
    registered_at: float = 0.0  # wall clock, for display
    last_heartbeat: float = 0.0  # wall clock, for display
    last_seen: float = 0.0  # monotonic, for expiry
    in_flight: int = 0
    # Its /dev/shm's identity (anyserve.shm.host_id): equal to the API
    # server's, tensors may reach it through shared memory. Empty: unknown.
    host: str = ""
    # Its local lane's socket (anyserve.replica.lane), used from this host only.
    lane: str = ""

    def ranked_best(self, query: Mapping[str, str], name: str) -> tuple[Rank, Capability] | None:
        """``(rank, capability)`` of this replica's best capability for a
        request, or None when none matches. The rank is ``(capability rank,
        loadable?)`` (see :func:`anyserve.capability.rank`): lower is better."""
        best: tuple[Rank, Capability] | None = None
        for loadable, caps in ((0, self.capabilities), (1, self.loadable)):
            for cap in caps:
                found = rank(cap, query, name)
                if found is not None and (best is None or (*found, loadable) < best[0]):
                    best = ((*found, loadable), cap)
        return best

    def to_json(self, now: float) -> dict[str, Any]:
        """The ``GET /registry`` view of this replica (``now`` is wall-clock time)."""
        return {
            "replica_id": self.replica_id,
            "endpoint": self.endpoint,
            "capabilities": [c.to_dict() for c in self.capabilities],
            "loadable": [c.to_dict() for c in self.loadable],
            "failed": [c.to_dict() for c in self.failed],
            "workers": self.workers,
            "registered_at": self.registered_at,
            "last_heartbeat": self.last_heartbeat,
            "last_heartbeat_age": round(max(0.0, now - self.last_heartbeat), 3),
            "in_flight": self.in_flight,
        }


class Served(NamedTuple):
    """A replica that can serve a request, how well, and by which capability."""

    rank: Rank
    replica: ReplicaEntry
    capability: Capability | None  # None: not known to match (a random pick)

    @classmethod
    def of(cls, replica: ReplicaEntry, query: Mapping[str, str], name: str) -> Served:
        """``replica`` with its best capability for the request (None if none)."""
        found = replica.ranked_best(query, name)
        return cls((), replica, None) if found is None else cls(found[0], replica, found[1])


class Registry:
    """Replicas by id. Not thread-safe: used from the server's event loop only."""

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._replicas: dict[str, ReplicaEntry] = {}
        # (key, value) -> ids of the replicas with a capability (served,
        # loadable or failed) holding that pair. A request ranks only the
        # replicas that can match it: with 1,000 replicas of 10 capabilities,
        # scanning them all cost ~6 ms per request.
        self._index: dict[tuple[str, str], set[str]] = {}
        # (query pairs, name) -> the replicas that can serve it, each with its
        # rank and capability: worked out once per change of who serves what,
        # not once per request (see serving). Cleared by every such change.
        self._ranked: dict[Key, list[Served]] = {}
        self._ranked_replicas = 0  # the lengths of _ranked's lists, summed

    def upsert(
        self,
        replica_id: str,
        endpoint: str,
        capabilities: Sequence[Capability],
        loadable: Sequence[Capability] = (),
        workers: Sequence[Any] = (),
        failed: Sequence[Capability] = (),
        *,
        age: float = 0.0,
        host: str = "",
        lane: str = "",
    ) -> tuple[ReplicaEntry, bool]:
        """Register or refresh a replica; its capabilities are replaced.

        ``age`` is how many seconds ago its heartbeat happened (0: now; a
        shared backend passes the age it read back). Returns ``(replica,
        created)``. The in-flight count survives a refresh.
        """
        now_wall, now = time.time() - age, self._clock() - age
        replica = self._replicas.get(replica_id)
        created = replica is None or not self._alive(replica, now)
        if replica is None:
            replica = ReplicaEntry(replica_id, endpoint, (), registered_at=now_wall)
            self._replicas[replica_id] = replica
        elif created:
            replica.registered_at = now_wall
        replica.endpoint, replica.host, replica.lane = endpoint, host, lane
        served = (tuple(capabilities), tuple(loadable), tuple(failed))
        if served != (replica.capabilities, replica.loadable, replica.failed):
            # A heartbeat usually repeats what it said: reindex only on a change.
            self._unindex(replica)
            self._forget_rankings()
            replica.capabilities, replica.loadable, replica.failed = served
            for pair in _pairs(replica):
                self._index.setdefault(pair, set()).add(replica_id)
        replica.workers = list(workers)
        replica.last_heartbeat = now_wall
        replica.last_seen = now
        return replica, created

    def now(self) -> float:
        """The registry's clock (monotonic seconds), the one ``last_seen`` is on."""
        return self._clock()

    def remove(self, replica_id: str) -> ReplicaEntry | None:
        """Drop a replica; returns it, or None when it was not registered."""
        replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            self._unindex(replica)
            self._forget_rankings()
        return replica

    def expire(self) -> list[ReplicaEntry]:
        """Drop and return every replica whose heartbeat is older than the TTL."""
        now = self._clock()
        stale = [r for r in self._replicas.values() if not self._alive(r, now)]
        for replica in stale:
            del self._replicas[replica.replica_id]
            self._unindex(replica)
            self._forget_rankings()
        return stale

    def get(self, replica_id: str) -> ReplicaEntry | None:
        """The live replica with this id, or None."""
        replica = self._replicas.get(replica_id)
        if replica is None or not self._alive(replica, self._clock()):
            return None
        return replica

    def __iter__(self) -> Iterator[ReplicaEntry]:
        """Live replicas, in registration order."""
        now = self._clock()
        return iter([r for r in self._replicas.values() if self._alive(r, now)])

    def __len__(self) -> int:
        now = self._clock()
        return sum(1 for r in self._replicas.values() if self._alive(r, now))

    def endpoints(self) -> set[str]:
        """Endpoints of every entry still held (stale ones included until swept)."""
        return {r.endpoint for r in self._replicas.values()}

    def candidates(
        self,
        query: Mapping[str, str],
        name: str,
        exclude: Collection[str] = (),
        host: str = "",
    ) -> list[ReplicaEntry]:
        """Live replicas that serve the query (or, without a query, the model
        name), best first: closest match, loaded before loadable, least in
        flight, ties in random order. Replicas in ``exclude`` are skipped;
        with ``host``, so are replicas on another host."""
        return [served.replica for served in self.serving(query, name, exclude, host)]

    def serving(
        self,
        query: Mapping[str, str],
        name: str,
        exclude: Collection[str] = (),
        host: str = "",
    ) -> list[Served]:
        """:meth:`candidates`, each with the capability it serves the request by."""
        key = (tuple(query.items()), name)
        served = self._ranked.get(key)
        if served is None:
            served = self._rank(query, name)
            if len(name) <= _RANKED_NAME:
                self._keep(key, served)
        now = self._clock()
        if len(served) == 1:  # most requests: nothing to sort
            replica = served[0].replica
            if replica.replica_id in exclude or not self._alive(replica, now):
                return []
            return [] if host and replica.host != host else [served[0]]
        ranked = [
            (one.rank, one.replica.in_flight, random.random(), one)
            for one in served
            if one.replica.replica_id not in exclude
            and self._alive(one.replica, now)
            and not (host and one.replica.host != host)
        ]
        ranked.sort(key=lambda item: item[:3])
        return [item[3] for item in ranked]

    def _keep(self, key: Key, served: list[Served]) -> None:
        """Keep a ranking, within the bounds (_RANKED_QUERIES, _RANKED_REPLICAS)."""
        self._ranked_replicas += len(served)
        if len(self._ranked) >= _RANKED_QUERIES or self._ranked_replicas > _RANKED_REPLICAS:
            self._ranked.clear()
            self._ranked_replicas = len(served)
        self._ranked[key] = served

    def _rank(self, query: Mapping[str, str], name: str) -> list[Served]:
        """Every registered replica that can serve the query or name, with its
        rank, alive or not (:meth:`serving` checks that per request)."""
        served = []
        for replica in self._matching(query, name):
            found = replica.ranked_best(query, name)
            if found is not None:
                served.append(Served(found[0], replica, found[1]))
        return served

    def failed_for(self, query: Mapping[str, str], name: str) -> list[ReplicaEntry]:
        """Live replicas that have the capability asked for but report it
        failed (see :attr:`ReplicaEntry.failed`)."""
        now = self._clock()
        return [
            r
            for r in self._matching(query, name)
            if self._alive(r, now) and any(rank(c, query, name) is not None for c in r.failed)
        ]

    def shuffled(self, exclude: Collection[str] = ()) -> list[ReplicaEntry]:
        """Every live replica not in ``exclude``, in random order (the
        ``--no-match random`` policy: a random replica may know one that serves)."""
        now = self._clock()
        found = [
            r
            for r in self._replicas.values()
            if r.replica_id not in exclude and self._alive(r, now)
        ]
        random.shuffle(found)
        return found

    def _matching(self, query: Mapping[str, str], name: str) -> list[ReplicaEntry]:
        """The replicas that may match (a superset: callers still rank them).

        A query matches only capabilities holding every one of its pairs, so
        the replicas listed under its rarest pair are enough; a name matches
        by ``model`` or ``type``."""
        if query:
            ids = min((self._index.get(pair, _NONE) for pair in query.items()), key=len)
        elif name:
            ids = self._index.get(("model", name), _NONE) | self._index.get(("type", name), _NONE)
        else:
            return []
        return [self._replicas[i] for i in ids]

    def _unindex(self, replica: ReplicaEntry) -> None:
        for pair in _pairs(replica):
            ids = self._index.get(pair)
            if ids is not None:
                ids.discard(replica.replica_id)
                if not ids:
                    del self._index[pair]

    def _forget_rankings(self) -> None:
        """Who serves what changed: every kept ranking may be wrong."""
        self._ranked.clear()
        self._ranked_replicas = 0

    def _alive(self, replica: ReplicaEntry, now: float) -> bool:
        return now - replica.last_seen <= self.ttl


_NONE: frozenset[str] = frozenset()


def _pairs(replica: ReplicaEntry) -> set[tuple[str, str]]:
    """Every (key, value) of the replica's capabilities, of every kind."""
    return {
        pair
        for caps in (replica.capabilities, replica.loadable, replica.failed)
        for cap in caps
        for pair in cap.items()
    }
