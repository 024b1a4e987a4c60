"""Everything one API server instance holds, passed to its HTTP and gRPC entries.

There is no module-level state: several servers can run in one process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from importlib import metadata

from anyserve.api_server.channels import ChannelPool
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.registry import Registry
from anyserve.api_server.registry_backend import RegistryBackend, make_backend
from anyserve.api_server.responses import Expiry
from anyserve.api_server.router import Router
from anyserve.api_server.sequences import Sequences
from anyserve.api_server.shared_memory import SharedMemory
from anyserve.api_server.shm_regions import RegionTable
from anyserve.metrics.api import ApiMetrics

_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}

# Triton extensions the API server speaks at its HTTP edge.
EXTENSIONS = [
    "binary_tensor_data",
    "generate",
    "model_configuration",
    "model_repository",
    "parameters",
    "sequence",
    "system_shared_memory",
]


def version() -> str:
    """The installed anyserve version ("0+unknown" when run from a bare checkout)."""
    try:
        return metadata.version("anyserve")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class ApiState:
    """Config, registry, channels and router of one server.

    ``registry`` is this server's view (what the router reads); ``backend``
    keeps it in step with other API servers'. Raises StartupError when the
    configured backend cannot be used (its package is missing).
    """

    config: ApiServerConfig
    registry: Registry = field(init=False)
    backend: RegistryBackend = field(init=False)
    pool: ChannelPool = field(init=False)
    router: Router = field(init=False)
    sequences: Sequences = field(init=False)
    shared_memory: SharedMemory = field(init=False)
    metrics: ApiMetrics = field(init=False)
    # Triton's system shared memory regions registered with this server.
    shm: RegionTable = field(init=False, default_factory=RegionTable)
    grpc_port: int = 0  # the bound port, set by the server once it listens
    # The gRPC entry's local lane (lane path, name), for context.call on this
    # host (api_server/grpc_entry.py); None: none.
    lane: tuple[str, str] | None = None
    draining: bool = False  # set by stop(): not ready any more
    # Set by stop() when the shutdown grace ran out: requests still running end
    # with 503 (unary) or an error event (streams) instead of being cut.
    expired: asyncio.Event = field(init=False, default_factory=Expiry)

    def __post_init__(self) -> None:
        cfg = self.config
        self.registry = Registry(cfg.effective_ttl)
        self.backend = make_backend(cfg, self.registry)
        self.pool = ChannelPool()
        self.router = Router(
            self.registry,
            self.pool,
            no_match=cfg.no_match,
            hop_limit=cfg.hop_limit,
            max_inflight=cfg.max_inflight_per_replica,
            connect_timeout=cfg.connect_timeout,
        )
        self.sequences = Sequences(self.registry, cfg.sequence_idle_timeout)
        self.shared_memory = SharedMemory(self.registry, cfg.shm_threshold, self.shm)
        self.metrics = ApiMetrics(self._census)
        self.router.on_decision = self.metrics.decision

    def served_names(self) -> set[str]:
        """The KServe model names the live replicas answer to."""
        return {c.name for r in self.registry for c in (*r.capabilities, *r.loadable)}

    def _census(self) -> tuple[int, int]:
        # Asked at scrape time only: (live replicas, distinct capabilities served).
        replicas = list(self.registry)
        caps = {c for r in replicas for c in (*r.capabilities, *r.loadable)}
        return len(replicas), len(caps)

    def grpc_endpoint(self, reached_host: str | None) -> str:
        """host:port replicas should dial for the gRPC entry.

        When bound to a wildcard address, the host the caller used to reach
        us is the one known to work from its side.
        """
        host = self.config.host
        if host in _WILDCARD_HOSTS:
            host = reached_host or "127.0.0.1"
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.grpc_port}"
