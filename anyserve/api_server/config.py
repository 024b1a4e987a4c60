"""The API server's settings, in one dataclass shared by every part of it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from anyserve.api_server import guard
from anyserve.api_server.limits import EdgeLimits

NoMatchPolicy = Literal["reject", "random"]
NO_MATCH_POLICIES: tuple[NoMatchPolicy, ...] = ("reject", "random")

MIB = 1024 * 1024

# URL schemes of the Redis registry backend (redis-py's).
REGISTRY_SCHEMES = ("redis://", "rediss://", "unix://")


def _env_token() -> str | None:
    return os.environ.get("ANYSERVE_TOKEN") or None


@dataclass
class ApiServerConfig:
    """How an :class:`~anyserve.api_server.server.ApiServer` listens, routes and limits.

    ``port``/``grpc_port`` 0 pick free ports (read the real ones from the server).
    ``no_match``: ``"reject"`` answers 404 when no replica matches; ``"random"``
    forwards to a random replica not yet visited, which may delegate it
    onwards. ``token`` (default: ``$ANYSERVE_TOKEN``) guards ``/register`` and
    ``/unregister``; without one they are taken from this machine only, and
    a non-loopback ``host`` needs ``insecure_register`` to start (see
    :mod:`anyserve.api_server.guard`). ``replica_networks`` (CIDRs) limits the
    endpoints replicas may register. ``ttl`` None means three heartbeat
    intervals. ``registry`` is where registrations are shared: ``"memory"``
    (this server only) or a Redis URL (``redis://host:6379/0``, ``rediss://``,
    ``unix://``) several API servers share (see
    :mod:`anyserve.api_server.registry_backend`). Raises ValueError for an
    invalid setting.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 8081
    no_match: NoMatchPolicy = "reject"
    token: str | None = field(default_factory=_env_token)
    hop_limit: int = 4
    heartbeat_interval: float = 2.0
    ttl: float | None = None
    max_body: int = 64 * MIB
    max_inflight_per_replica: int = 256
    # Seconds a request may take when the client set no deadline of its own.
    request_timeout: float = 300.0
    # Seconds to wait for a TCP/HTTP2 connection to a replica before trying another.
    connect_timeout: float = 5.0
    # Seconds stop() lets in-flight requests (SSE streams included) finish
    # before it ends them with an error (`--grace`, like a replica's).
    shutdown_grace: float = 10.0
    # Seconds between SSE keep-alive comments (0 disables them).
    sse_ping: float = 15.0
    # Seconds a Triton sequence (or X-Session-Id session) may go without a
    # request before its replica affinity is forgotten.
    sequence_idle_timeout: float = 60.0
    # Serve on a non-loopback address without a token (registration stays local).
    insecure_register: bool = False
    # CIDRs registered replica endpoints must be in (empty: any host:port).
    replica_networks: tuple[str, ...] = ()
    # "memory", or a Redis URL shared by several API servers.
    registry: str = "memory"
    # Raw inputs of at least this many bytes reach a replica on this host
    # through shared memory (api_server/shared_memory.py); 0 turns that off.
    shm_threshold: int = 1024 * 1024
    # Serve the gRPC entry's inference calls on a Unix socket too, for
    # context.call from this host (anyserve.lane_server).
    lane: bool = True
    # HTTP read timeouts, connection cap, big-body gate (api_server/limits.py).
    edge: EdgeLimits = field(default_factory=EdgeLimits)
    networks: tuple[guard.Network, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.no_match not in NO_MATCH_POLICIES:
            raise ValueError(f"no_match must be one of {NO_MATCH_POLICIES}, not {self.no_match!r}")
        if self.shm_threshold < 0:
            raise ValueError("shm_threshold must be 0 (off) or a number of bytes")
        if self.hop_limit < 1:
            raise ValueError("hop_limit must be at least 1")
        if self.heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be positive")
        if self.ttl is not None and self.ttl <= 0:
            raise ValueError("ttl must be positive")
        if self.max_body <= 0 or self.max_inflight_per_replica <= 0:
            raise ValueError("max_body and max_inflight_per_replica must be positive")
        if self.request_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("request_timeout and connect_timeout must be positive")
        if self.sequence_idle_timeout <= 0:
            raise ValueError("sequence_idle_timeout must be positive")
        self.networks = guard.parse_networks(self.replica_networks)
        if self.registry != "memory" and not self.registry.startswith(REGISTRY_SCHEMES):
            raise ValueError(
                f"registry must be 'memory' or a Redis URL ({', '.join(REGISTRY_SCHEMES)}...),"
                f" not {self.registry!r}"
            )
        if not self.token and not self.insecure_register and not guard.is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host} without a token: replicas on other hosts"
                " could not register, and anyone could read the registry. Set --token (or"
                " ANYSERVE_TOKEN), or pass --insecure-register to serve anyway with"
                " registration from this machine only"
            )

    @property
    def effective_ttl(self) -> float:
        """Seconds after its last heartbeat that a replica is dropped."""
        return self.ttl if self.ttl is not None else 3 * self.heartbeat_interval
