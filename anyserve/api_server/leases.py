"""A request's hold on one replica while it is sent there (:class:`Lease`),
and what its successive attempts share (the router's retry rule: see
router.py's docstring)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from anyserve.api_server.channels import ReplicaConnection
from anyserve.api_server.registry import ReplicaEntry
from anyserve.errors import DeadlineExceeded
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
        left = self.deadline - time.monotonic()
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


class NotSent(Exception):
    """A call failed before it left (see ``never_sent``): try another replica."""
