"""A request's hold on one replica while it is sent there (:class:`Lease`),
and what its successive attempts share (the router's retry rule: see
router.py's docstring)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import grpc.aio

from anyserve import rpc, tracing
from anyserve.api_server.abandoned import new_call_id
from anyserve.api_server.channels import ReplicaConnection
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.registry import ReplicaEntry
from anyserve.errors import DeadlineExceeded, from_rpc_error
from anyserve.lane_client import Lane


@dataclass(slots=True)
class Lease:
    """A replica chosen for one request, connected, with its in-flight slot held."""

    replica: ReplicaEntry
    conn: ReplicaConnection
    metadata: list[tuple[str, str]]
    deadline: float  # time.monotonic() by which the call must end
    call_id: str  # names the call to the replica's Cancel (api_server/abandoned.py)
    lane: Lane | None = None  # the replica's local lane, when it is on this host

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none are."""
        return remaining(self.deadline)


def call_metadata(
    meta: RequestMeta, replica: ReplicaEntry, others: int
) -> tuple[list[tuple[str, str]], str]:
    """The metadata of the call to ``replica`` (``others``: how many other
    replicas could have taken it) and the call's id; tells ``meta.pin``."""
    metadata = meta.metadata()
    call_id = new_call_id()
    metadata.append((rpc.CALL_ID, call_id))
    if not others:
        metadata.append((rpc.SOLE_CANDIDATE, "1"))
    if tracing.ENABLED:  # names the replica on the span, passes it on
        tracing.routed(metadata, replica.replica_id, meta.query, meta.model_name)
    if meta.pin is not None:
        meta.pin.chose(replica)
    return metadata, call_id


def remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (``time.monotonic()``); raises
    DeadlineExceeded when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("deadline passed before the request reached a replica")
    return left


# How gRPC fails a fail-fast call for which no connection could be picked:
# the call never reached a transport, so the replica never saw it.
NOT_SENT = "failed to connect to all addresses"


def never_sent(code: grpc.StatusCode, details: str | None) -> bool:
    return code == grpc.StatusCode.UNAVAILABLE and (details or "").startswith(NOT_SENT)


@dataclass(slots=True)
class Attempts:
    """What one request's successive leases share: its deadline, the
    replicas found unreachable, and whether it fell back to a random pick."""

    deadline: float
    unreachable: list[ReplicaEntry] = field(default_factory=list)
    random_mode: bool = False


async def send_one(call: grpc.aio.StreamStreamCall, body: bytes) -> None:
    """Write a stream call's one request and half-close; raises NotSent when
    the call failed before it left, the anyserve error when it failed otherwise."""
    try:
        await call.write(body)
        await call.done_writing()
    except asyncio.InvalidStateError:
        # The call already ended: read() reports its status, unless it never left.
        if never_sent(await call.code(), await call.details()):
            raise NotSent from None
    except grpc.aio.AioRpcError as exc:
        if never_sent(exc.code(), exc.details()):
            raise NotSent from None
        raise from_rpc_error(exc) from None


class NotSent(Exception):
    """A call failed before it left (see ``never_sent``): try another replica."""
