"""Choosing a replica for a request and forwarding its serialized bytes there.

Choice (docs/architecture.md): the registry's best candidate that is
not at its in-flight cap; a delegated request (``x-delegated-from``) excludes
every replica on its visited list and is refused with LoopDetected once that
list reaches the hop limit; when nothing matches, ``no_match="reject"`` answers
NotFound and ``"random"`` forwards to a random replica not yet visited. A
delegated request for which replicas exist but every one of them was visited
already went round in a circle: LoopDetected naming them, not NotFound.

Retry rule: a request is retried on another candidate only when the
connection to the chosen replica could not be made. The router checks the
channel's connectivity *before* it starts the call (:meth:`Connection.connect`):
if the channel does not reach READY (connection refused, unreachable, backoff
after a failure, or the connect timeout), nothing was sent and another replica
may safely take the request. The connection can still die between that check
and the call (a replica killed at that moment): gRPC then fails the call while
picking a connection for it, with UNAVAILABLE "failed to connect to all
addresses", before any byte left, and that is retried the same way. Every
other failure of a started call is final, UNAVAILABLE included: it may be the
replica's own answer (a worker crashed while serving) or the connection dying
mid-request, and in both cases the request may already have run, so it must
not run twice.

Local lane: ``ModelInfer`` and stream requests to a replica that registered
a lane on this host (the same ``host``) go through it (anyserve/lane_client.py)
instead of gRPC; its connection is the one checked, and a replica that
refuses a call unrun (it is stopping) counts as not reached. A lane that
cannot be opened leaves the replica's calls on gRPC for a while.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager

import grpc.aio

from anyserve import rpc, shm, versions
from anyserve.api_server.abandoned import Abandoned, answer
from anyserve.api_server.channels import (
    Connections,
    ReplicaStream,
    StreamResponses,
)
from anyserve.api_server.config import NoMatchPolicy
from anyserve.api_server.leases import (
    Attempts,
    Lease,
    NotSent,
    call_metadata,
    never_sent,
    remaining,
    send_one,
)
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import Registry, ReplicaEntry, Served
from anyserve.errors import (
    DeadlineExceeded,
    LoopDetected,
    NotFound,
    Overloaded,
    Unavailable,
    from_rpc_error,
)
from anyserve.lane_client import Refused

logger = logging.getLogger(__name__)

#: Retry-After (seconds) of a capability that is down: an operator must restart
#: it, so a client polling faster only adds load.
DOWN_RETRY_AFTER = 30.0
# Why a call is tried elsewhere when its replica took nothing (the log says).
_NOT_SENT = "did not take the request (the connection failed before it left, or it is stopping)"


class Router:
    """Picks replicas and forwards requests; see the module docstring."""

    def __init__(
        self,
        registry: Registry,
        pool: Connections,
        *,
        no_match: NoMatchPolicy = "reject",
        hop_limit: int = 4,
        max_inflight: int = 256,
        connect_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.no_match = no_match
        self.hop_limit = hop_limit
        self.max_inflight = max_inflight
        self.connect_timeout = connect_timeout
        #: This host's identity (anyserve.shm.host_id): replicas that registered
        #: the same one and a local lane are called through it, not gRPC.
        self.host = shm.host_id()
        #: Ends the calls whose requests stopped waiting; its run() is a task
        #: of the API server.
        self.abandoned = Abandoned()
        #: Told each routing decision ("chosen", "no_match", "delegated",
        #: "retried"): the server's metrics (anyserve.metrics.api) hook in here.
        self.on_decision: Callable[[str], None] = lambda decision: None

    async def unary(
        self,
        path: str,
        body: bytes,
        meta: RequestMeta,
        *,
        allow_random: bool = True,
        gather: bool = False,
    ) -> bytes:
        """Send ``body`` to ``path`` on a chosen replica; return its response bytes.
        ``gather``: the call may wait a moment on a busy lane for company
        (``Lane.unary``).

        Raises NotFound, LoopDetected, Overloaded, Unavailable, DeadlineExceeded
        or the error the replica answered with.
        """
        attempts = self._attempts(meta)
        while True:
            picked = self._pick(meta, attempts, allow_random)
            replica, others = picked
            conn = self.pool.get(replica.endpoint)
            lane = None
            if path == rpc.MODEL_INFER and self._local(replica):
                lane = conn.open_lane(replica)
            if lane is not None:
                # Its lane is open (most calls on one host): nothing to connect,
                # so no lease held across a connection attempt.
                replica.in_flight += 1
                conn.calls += 1
                try:
                    metadata, _ = call_metadata(meta, replica, others)
                    left = remaining(attempts.deadline)
                    return await lane.unary(body, metadata, left, gather=gather)
                except Refused:
                    self._skip(meta, replica, attempts, _NOT_SENT)
                    continue
                finally:
                    replica.in_flight -= 1
                    conn.calls -= 1
            try:
                async with self.lease(
                    meta, allow_random=allow_random, attempts=attempts, picked=picked
                ) as lease:
                    if lease.lane is not None and path == rpc.MODEL_INFER:
                        try:
                            return await lease.lane.unary(
                                body, lease.metadata, lease.remaining(), gather=gather
                            )
                        except Refused:
                            raise NotSent from None
                    call = lease.conn.unary(path)(
                        body,
                        timeout=lease.remaining(),
                        metadata=lease.metadata,
                        wait_for_ready=False,
                    )
                    try:
                        response = await answer(call)
                    except grpc.aio.AioRpcError as exc:
                        if never_sent(exc.code(), exc.details()):
                            raise NotSent from None
                        raise from_rpc_error(exc) from None
                    except asyncio.CancelledError:
                        self.abandoned.add(lease.conn, call, lease.call_id)
                        raise
                    assert isinstance(response, bytes)
                    return response
            except NotSent:
                continue  # lease() marked the replica unreachable

    @asynccontextmanager
    async def stream(
        self, body: bytes, meta: RequestMeta, *, batched: bool = False
    ) -> AsyncIterator[StreamResponses]:
        """Send one request on a replica's ``ModelStreamInfer`` and half-close.

        Yields its responses; leaving the block cancels the call if it is still
        running (the client went away). ``batched`` asks the replica to send
        every response ready at once in one message (read them with
        ``read_batch``). Raises like :meth:`unary` on entry.
        """
        attempts = self._attempts(meta)
        while True:
            try:
                async with self.lease(meta, attempts=attempts) as lease:
                    if lease.lane is not None:
                        try:
                            lane_stream = lease.lane.stream(
                                body, lease.metadata, lease.remaining(), lease.replica
                            )
                        except Refused:
                            raise NotSent from None
                        try:
                            yield lane_stream
                            return
                        finally:
                            lane_stream.stop()  # still running: the client went away
                    metadata = [*lease.metadata, (rpc.BATCH, "1")] if batched else lease.metadata
                    call = lease.conn.stream()(
                        None,
                        timeout=lease.remaining(),
                        metadata=metadata,
                        wait_for_ready=False,
                    )
                    stream: ReplicaStream | None = None
                    try:
                        await send_one(call, body)
                        # Reading starts once the request is out: a read
                        # that begins while gRPC still sends the headers can
                        # leave the write waiting for them forever.
                        stream = ReplicaStream(call, lease.replica, batched, self.abandoned.spawn)
                        yield stream
                        return
                    finally:
                        # Still running: the client went away (abandoned.py).
                        if stream is not None:
                            stream.stop()
                        self.abandoned.add(lease.conn, call, lease.call_id)
            except NotSent:
                continue  # lease() marked the replica unreachable

    def _attempts(self, meta: RequestMeta) -> Attempts:
        self._check_hops(meta)
        if meta.delegated_from:
            self.on_decision("delegated")
        # time.monotonic(), not anyio.current_time(): the same clock without
        # anyio's lookups and a system call per reading (get_running_loop).
        return Attempts(time.monotonic() + meta.timeout)

    @asynccontextmanager
    async def lease(
        self,
        meta: RequestMeta,
        *,
        allow_random: bool = True,
        attempts: Attempts | None = None,
        picked: tuple[ReplicaEntry, int] | None = None,
    ) -> AsyncIterator[Lease]:
        """Choose and connect a replica for ``meta``, holding an in-flight slot.

        Tries further candidates only when a connection could not be made
        (see the module docstring); raises when none is left. A block that
        raises ``NotSent`` marks its replica unreachable in ``attempts`` (the
        caller then leases again with the same ``attempts``). ``picked``: the
        first choice, already made by :meth:`_pick`. ``meta.pin``: see sequences.py.
        """
        if attempts is None:
            attempts = self._attempts(meta)
        deadline = attempts.deadline
        while True:
            replica, others = picked or self._pick(meta, attempts, allow_random)
            picked = None
            conn = self.pool.get(replica.endpoint)
            replica.in_flight += 1
            conn.calls += 1
            try:
                left = deadline - time.monotonic()
                within = min(self.connect_timeout, max(left, 0.0))
                lane = await conn.local(replica, within) if self._local(replica) else None
                if lane is not None or await conn.connect(within):
                    try:
                        metadata, call_id = call_metadata(meta, replica, others)
                        yield Lease(replica, conn, metadata, deadline, call_id, lane)
                    except NotSent:
                        self._skip(meta, replica, attempts, _NOT_SENT)
                        raise
                    return
            finally:
                replica.in_flight -= 1
                conn.calls -= 1
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(
                    f"deadline passed while connecting to replica {replica.replica_id}"
                )
            self._skip(meta, replica, attempts, "is unreachable")

    def _pick(
        self, meta: RequestMeta, attempts: Attempts, allow_random: bool
    ) -> tuple[ReplicaEntry, int]:
        """The replica for the next attempt and how many others could have
        taken it; notes the choice on ``meta``."""
        chosen, attempts.random_mode, others = self._choose(
            meta, attempts.unreachable, attempts.random_mode, allow_random
        )
        meta.replica_id = chosen.replica.replica_id
        meta.capability = chosen.capability
        self.on_decision("chosen")
        return chosen.replica, others

    def _local(self, replica: ReplicaEntry) -> bool:
        """Whether ``replica`` registered a lane on this host."""
        return bool(replica.lane and self.host and replica.host == self.host)

    def _skip(self, meta: RequestMeta, replica: ReplicaEntry, attempts: Attempts, why: str) -> None:
        """``replica`` was not reached (``why``, for the log): mark it
        unreachable for this request, which tries another."""
        logger.warning(
            "request %s: replica %s at %s %s; trying another",
            meta.request_id,
            replica.replica_id,
            replica.endpoint,
            why,
        )
        attempts.unreachable.append(replica)
        self.on_decision("retried")

    def _check_hops(self, meta: RequestMeta) -> None:
        # The count is the visited list itself: a forged header can only make
        # it longer (and the request fail sooner), never reset it.
        if meta.delegated_from and len(meta.visited) >= self.hop_limit:
            raise LoopDetected(
                f"{meta.describe()} was delegated {len(meta.visited)} times"
                f" (hop limit {self.hop_limit}); replicas tried: {', '.join(meta.visited)}"
            )

    def _choose(
        self,
        meta: RequestMeta,
        unreachable: list[ReplicaEntry],
        random_mode: bool,
        allow_random: bool,
    ) -> tuple[Served, bool, int]:
        """``(the pick with its capability, random mode?, how many others could take it)``."""
        if meta.pin is not None and (pinned := meta.pin.replica(self.registry, unreachable)):
            return Served.of(pinned, meta.query, meta.model_name), random_mode, 0  # sole one
        exclude: Collection[str] = ()  # most requests: nothing to skip
        if meta.visited or unreachable:
            exclude = {*meta.visited, *(r.replica_id for r in unreachable)}
        if not random_mode:
            served = self.registry.serving(meta.query, meta.model_name, exclude, meta.host)
            if served:
                return self._first_free(served, meta, "match"), False, len(served) - 1
            if unreachable:
                raise self._unreachable(meta, unreachable)
        if allow_random and self.no_match == "random":
            found = [Served((), r, None) for r in self.registry.shuffled(exclude)]
            if found:
                chosen = self._first_free(found, meta, "random (no match)")
                return Served.of(chosen.replica, meta.query, meta.model_name), True, len(found) - 1
            if unreachable:
                raise self._unreachable(meta, unreachable)
        if meta.visited and self._went_round(meta, allow_random):
            raise LoopDetected(
                f"{meta.describe()} went round every replica that could take it"
                f" without being served; replicas tried: {', '.join(meta.visited)}"
            )
        down = self.registry.failed_for(meta.query, meta.model_name)
        if down:
            names = ", ".join(r.replica_id for r in down)
            raise Unavailable(
                f"{meta.describe()} is down on {names}: its workers keep crashing (see"
                " GET /registry); restart it with `anyserve workers start`",
                retry_after=DOWN_RETRY_AFTER,
            )
        tried = f"; replicas tried: {', '.join(meta.visited)}" if meta.visited else ""
        self.on_decision("no_match")
        detail = f"no replica serves {meta.describe()}{tried}"
        name = meta.model_name  # Triton's words for an unknown model name
        raise NotFound(detail if meta.query else versions.unknown_model(name, "", detail))

    def _went_round(self, meta: RequestMeta, allow_random: bool) -> bool:
        """True when a delegated request found nothing left only because every
        replica it could go to was visited already: a loop, not a miss."""
        if self.registry.candidates(meta.query, meta.model_name):
            return True
        return allow_random and self.no_match == "random" and len(self.registry) > 0

    def _first_free(self, found: list[Served], meta: RequestMeta, why: str) -> Served:
        for served in found:
            replica = served.replica
            if replica.in_flight < self.max_inflight:
                if logger.isEnabledFor(logging.DEBUG):
                    via = f", delegated; excluded {list(meta.visited)}" if meta.visited else ""
                    logger.debug(
                        "request %s -> replica %s (%s for %s%s; %d in flight)",
                        meta.request_id,
                        replica.replica_id,
                        why,
                        meta.describe(),
                        via,
                        replica.in_flight,
                    )
                return served
        raise Overloaded(
            f"every replica for {meta.describe()} has {self.max_inflight} requests in flight",
            retry_after=1.0,
        )

    @staticmethod
    def _unreachable(meta: RequestMeta, unreachable: list[ReplicaEntry]) -> Unavailable:
        names = ", ".join(f"{r.replica_id} ({r.endpoint})" for r in unreachable)
        return Unavailable(f"no reachable replica for {meta.describe()}; unreachable: {names}")
