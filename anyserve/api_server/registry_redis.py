"""The Redis registry backend: several API servers share one set of replicas.

Layout (``PREFIX`` = ``anyserve:registry:``):

* ``PREFIX replica:<id>``: one JSON record per replica (:func:`to_record`),
  with a Redis TTL equal to the registry TTL. The API server a replica
  heartbeats with rewrites it on every heartbeat, so it expires by itself
  when the heartbeats stop.
* ``PREFIX events``: a pub/sub channel; every write and delete is announced
  there with its record, and every API server applies it to its view.
* ``PREFIX epoch``: a random value set once (``SET NX``). When it changes or
  vanishes, Redis was restarted or emptied.

Each API server keeps routing on its own view (:class:`~anyserve.api_server.
registry.Registry`) and its own in-flight counts. It follows Redis by pub/sub
and by a full resync every heartbeat interval (and after every reconnection),
which also catches a message lost while the subscription was down. A resync
refreshes or adds what Redis holds (the in-flight counts survive) and drops
what Redis held before in the same epoch and no longer holds (deleted: its
announcement was missed), unless it was refreshed since the resync began.
What Redis lost by being emptied is kept: the replicas' next heartbeats write
it again, and a replica that stopped expires by the local TTL. Replicas that heartbeat here and are
missing from Redis are written again at once.

When Redis cannot be reached the API server keeps routing on its last view
(replicas heartbeating with it still expire by the TTL; the others are kept,
as nothing can refresh them), says so in ``GET /health`` and in one log
line per outage, and catches up by a resync once Redis answers again. Writes
never wait on Redis in the request path: :meth:`RedisBackend.stored` queues
them for a writer task (the newest record per replica wins).
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from anyserve.api_server.registry import Registry, ReplicaEntry
from anyserve.capability import Capability

logger = logging.getLogger(__name__)

PREFIX = "anyserve:registry:"
REPLICA_PREFIX = PREFIX + "replica:"
EVENTS = PREFIX + "events"
EPOCH = PREFIX + "epoch"

# Why the connection failed, however redis-py or the OS put it.
_LOST = (RedisError, OSError)


def to_record(replica: ReplicaEntry) -> dict[str, Any]:
    """The JSON record stored for a replica (no in-flight count: that is per API server)."""
    return {
        "replica_id": replica.replica_id,
        "endpoint": replica.endpoint,
        "capabilities": [c.to_dict() for c in replica.capabilities],
        "loadable": [c.to_dict() for c in replica.loadable],
        "failed": [c.to_dict() for c in replica.failed],
        "workers": replica.workers,
        "registered_at": replica.registered_at,
        "host": replica.host,
        "lane": replica.lane,
    }


def apply_record(view: Registry, record: Any, *, age: float = 0.0) -> ReplicaEntry:
    """Upsert ``record`` (from :func:`to_record`, heartbeat ``age`` seconds ago)
    into ``view``; its in-flight count survives. Raises ValueError for a record
    of the wrong shape."""
    if not isinstance(record, dict):
        raise ValueError("a replica record must be a JSON object")
    replica_id, endpoint = record.get("replica_id"), record.get("endpoint")
    if not isinstance(replica_id, str) or not isinstance(endpoint, str):
        raise ValueError("a replica record needs string 'replica_id' and 'endpoint'")
    workers = record.get("workers", [])
    if not isinstance(workers, list):
        raise ValueError("'workers' must be a list")
    replica, created = view.upsert(
        replica_id,
        endpoint,
        _caps(record, "capabilities"),
        _caps(record, "loadable"),
        workers,
        _caps(record, "failed"),
        age=age,
        host=str(record.get("host", "")),
        lane=str(record.get("lane", "")),
    )
    registered_at = record.get("registered_at")
    if created and isinstance(registered_at, int | float):
        replica.registered_at = float(registered_at)
    return replica


def _caps(record: dict[str, Any], key: str) -> list[Capability]:
    items = record.get(key, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError(f"{key!r} must be a list of objects")
    return [Capability(item) for item in items]


def redacted(url: str) -> str:
    """``url`` without its password, for logs and ``/health``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisBackend:
    """Shares registrations through Redis (see the module docstring).

    ``url`` is a redis-py URL (``redis://host:6379/0``, ``rediss://``,
    ``unix://``); ``view`` is this API server's registry, whose TTL becomes
    the Redis TTL. Use from the server's event loop only.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        view: Registry,
        *,
        heartbeat_interval: float,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.view = view
        # A full resync this often; an unreachable Redis is tried this often.
        self.resync_interval = heartbeat_interval
        self.retry_interval = min(1.0, heartbeat_interval)
        self._timeout = timeout
        # Completed resyncs and failed exchanges, for tests and debugging.
        self.resyncs = 0
        self.failures = 0
        self._origin = secrets.token_hex(8)  # our own announcements are skipped
        self._connected = False
        self._error: str | None = "not connected yet"
        self._outage_logged = False
        self._epoch: bytes | str | None = None
        # Replica id -> record to write (None: delete), drained by the writer.
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._wake: anyio.Event | None = None
        # Replica id -> monotonic time of its last heartbeat to this server.
        self._direct: dict[str, float] = {}
        # Replicas Redis held since the epoch last changed: one of them missing
        # now was deleted (a missed announcement), not lost with the data.
        self._in_redis: set[str] = set()

    # ------------------------------------------------------------------ control plane

    def stored(self, replica: ReplicaEntry) -> None:
        self._direct[replica.replica_id] = self.view.now()
        self._queue(replica.replica_id, to_record(replica))

    def removed(self, replica_id: str) -> None:
        self._direct.pop(replica_id, None)
        self._queue(replica_id, None)

    def _queue(self, replica_id: str, record: dict[str, Any] | None) -> None:
        self._pending[replica_id] = record
        if self._wake is not None:
            self._wake.set()

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "connected": self._connected,
            "error": None if self._connected else self._error,
        }

    @property
    def connected(self) -> bool:
        """True while the last exchange with Redis succeeded."""
        return self._connected

    # ------------------------------------------------------------------ background

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write queued changes and follow Redis until cancelled. Never raises
        for a Redis failure: that is an outage, retried every second at most."""
        client = redis.Redis.from_url(
            self.url,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # The loops here retry; redis-py's own retries would only delay
            # noticing an outage.
            retry=Retry(NoBackoff(), 0),
        )
        self._wake = anyio.Event()
        if self._pending:
            self._wake.set()  # queued before we ran
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write, client)
                tg.start_soon(self._follow, client)
                tg.start_soon(self._hold)
                task_status.started()
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def _write(self, client: redis.Redis) -> None:
        ttl_ms = max(1, round(self.view.ttl * 1000))
        while True:
            assert self._wake is not None
            await self._wake.wait()
            self._wake = anyio.Event()
            if not self._connected:
                # Records are dropped: heartbeats rewrite them, and the resync
                # after the reconnection rewrites this server's replicas at
                # once. Deletes wait for Redis (or a resync would bring the
                # replica back until its key expired).
                self._pending = {k: v for k, v in self._pending.items() if v is None}
                continue
            batch, self._pending = self._pending, {}
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for replica_id, record in batch.items():
                        key = REPLICA_PREFIX + replica_id
                        if record is None:
                            pipe.delete(key)
                            event: dict[str, Any] = {"op": "remove", "replica_id": replica_id}
                        else:
                            pipe.set(key, json.dumps(record), px=ttl_ms)
                            event = {"op": "upsert", "record": record}
                        pipe.publish(EVENTS, json.dumps({"from": self._origin, **event}))
                    await pipe.execute()
            except _LOST as exc:
                self._lost(exc)

    async def _follow(self, client: redis.Redis) -> None:
        while True:
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(EVENTS)
                    # Subscribed before the resync: nothing announced after it is missed.
                    await self._resync(client)
                    self._found()
                    await self._listen(client, pubsub)
            except _LOST as exc:
                self._lost(exc)
            await anyio.sleep(self.retry_interval)

    async def _hold(self) -> None:
        # While Redis is out of reach, other servers' replicas cannot be
        # refreshed: they are kept (routing goes on with the last view; the
        # router's connect check skips one that died meanwhile) rather than
        # left to expire. The resync after the outage sorts them out.
        while True:
            await anyio.sleep(min(self.retry_interval, self.view.ttl / 3))
            if not self._connected:
                now = self.view.now()
                for replica in self.view:
                    if replica.replica_id not in self._direct:
                        replica.last_seen = now

    async def _listen(self, client: redis.Redis, pubsub: Any) -> None:
        next_resync = self.view.now() + self.resync_interval
        while True:
            wait = max(0.0, next_resync - self.view.now())
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            if message is not None and message.get("type") == "message":
                self._apply(message["data"])
            if self.view.now() >= next_resync:
                await self._resync(client)
                self._found()
                next_resync = self.view.now() + self.resync_interval

    def _apply(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            if not isinstance(event, dict) or event.get("from") == self._origin:
                return
            if event.get("op") == "upsert":
                self._in_redis.add(apply_record(self.view, event.get("record")).replica_id)
            elif event.get("op") == "remove":
                replica_id = event.get("replica_id")
                if isinstance(replica_id, str):
                    # It left through another server (it failed over there).
                    self._direct.pop(replica_id, None)
                    self.view.remove(replica_id)
        except ValueError as exc:
            logger.debug("ignoring a malformed registry event: %s", exc)

    async def _resync(self, client: redis.Redis) -> None:
        """Make the view what Redis holds (see the module docstring)."""
        started = self.view.now()
        await client.set(EPOCH, secrets.token_hex(8), nx=True)
        epoch = await client.get(EPOCH)
        if epoch != self._epoch:
            self._in_redis = set()  # emptied or restarted: nothing it held is known
        keys = [key async for key in client.scan_iter(match=REPLICA_PREFIX + "*", count=500)]
        found: set[str] = set()
        if keys:
            async with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                    pipe.pttl(key)
                answers = await pipe.execute()
            for raw, pttl in zip(answers[::2], answers[1::2], strict=True):
                if raw is None or not isinstance(pttl, int) or pttl < 0:
                    continue  # expired between SCAN and GET
                try:
                    record = json.loads(raw)
                    if isinstance(record, dict) and self._deleting(record.get("replica_id")):
                        continue  # it unregistered here; the delete has not reached Redis
                    replica = apply_record(
                        self.view, record, age=max(0.0, self.view.ttl - pttl / 1000)
                    )
                except ValueError as exc:
                    logger.debug("ignoring a malformed replica record in Redis: %s", exc)
                    continue
                found.add(replica.replica_id)
        now = self.view.now()
        for replica_id, seen in list(self._direct.items()):
            if now - seen > self.view.ttl:
                del self._direct[replica_id]
        for replica in list(self.view):
            if replica.replica_id in found:
                continue
            heard = self._direct.get(replica.replica_id)
            if heard is not None and now - heard <= self.view.ttl / 2:
                # Heartbeating here, yet Redis lost it (emptied, or our write
                # was dropped during an outage): write it again now.
                self._queue(replica.replica_id, to_record(replica))
            elif replica.replica_id in self._in_redis and replica.last_seen < started:
                self.view.remove(replica.replica_id)
        self._in_redis = found
        self._epoch = epoch
        self.resyncs += 1

    def _deleting(self, replica_id: object) -> bool:
        return (
            isinstance(replica_id, str)
            and replica_id in self._pending
            and (self._pending[replica_id] is None)
        )

    # ------------------------------------------------------------------ outage state

    def _lost(self, exc: BaseException) -> None:
        self.failures += 1
        self._connected = False
        self._error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not self._outage_logged:
            self._outage_logged = True
            logger.warning(
                "registry: %s Redis at %s (%s); routing on the last known replicas,"
                " retrying every %.1fs",
                "lost" if self._epoch is not None else "cannot reach",
                redacted(self.url),
                self._error,
                self.retry_interval,
            )

    def _found(self) -> None:
        if not self._connected:
            self._connected = True
            if self._pending and self._wake is not None:
                self._wake.set()
            self._error = None
            if self._outage_logged:
                logger.info("registry: Redis at %s is back; view resynced", redacted(self.url))
            else:
                logger.info("registry: following Redis at %s", redacted(self.url))
            self._outage_logged = False
