"""Where registrations live beyond one API server's view: the registry backends.

Every API server routes on its own in-memory :class:`~anyserve.api_server.
registry.Registry` (the *view*; the router's hot path never leaves it). A
backend keeps that view in step with the other API servers':

* :class:`MemoryBackend` (``--registry memory``, the default): nothing is
  shared; the view is the whole registry.
* :class:`~anyserve.api_server.registry_redis.RedisBackend`
  (``--registry redis://host:6379/0``): registrations are written through to
  Redis and followed from it, so several API servers share one set of replicas.

The control plane (:mod:`anyserve.api_server.control`) upserts the view first,
then tells the backend (:meth:`RegistryBackend.stored`/:meth:`~RegistryBackend.
removed`); neither call waits on the network, so a slow or lost backend never
slows a heartbeat or a request.
"""

from __future__ import annotations

from typing import Any, Protocol

import anyio

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.registry import Registry, ReplicaEntry
from anyserve.errors import StartupError

MEMORY = "memory"


class RegistryBackend(Protocol):
    """What the API server needs from a registry backend."""

    @property
    def name(self) -> str:
        """``"memory"`` or ``"redis"`` (shown by ``GET /health``)."""
        ...

    def stored(self, replica: ReplicaEntry) -> None:
        """``replica`` was just registered or refreshed here (already in the view)."""

    def removed(self, replica_id: str) -> None:
        """``replica_id`` just unregistered here (already out of the view)."""

    def status(self) -> dict[str, Any]:
        """The ``"registry"`` object of ``GET /health``: ``backend`` and, for a
        shared one, ``connected`` and the last ``error``."""
        ...

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the view in step until cancelled (never returns otherwise)."""


class MemoryBackend:
    """Nothing shared: the view is the registry (one API server)."""

    name = MEMORY

    def stored(self, replica: ReplicaEntry) -> None:
        pass

    def removed(self, replica_id: str) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"backend": MEMORY}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await anyio.sleep_forever()


def make_backend(config: ApiServerConfig, view: Registry) -> RegistryBackend:
    """The backend ``config.registry`` names, keeping ``view`` in step.

    Raises StartupError when it needs the ``redis`` package and that is not
    installed. Connects to nothing yet: :meth:`RegistryBackend.run` does.
    """
    if config.registry == MEMORY:
        return MemoryBackend()
    try:
        from anyserve.api_server.registry_redis import RedisBackend
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("redis"):
            raise
        raise StartupError(
            "--registry redis://... needs the redis package: pip install 'anyserve[redis]'"
        ) from None
    return RedisBackend(
        config.registry,
        view,
        heartbeat_interval=config.heartbeat_interval,
    )
