"""A whole local system in one event loop: API server, replicas, object store.

What ``anyserve run`` starts and what the end-to-end tests use: one API server,
one replica per app (each with its real worker processes), and a shared object
store directory (a temporary one unless given). Replicas register over real
HTTP and serve over real gRPC, exactly as separate processes would.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.server import ApiServer
from anyserve.replica.server import Replica, ReplicaConfig


@dataclass
class Cluster:
    """Handles on a running local cluster."""

    api: ApiServer
    replicas: list[Replica] = field(default_factory=list)
    object_store: str = ""

    @property
    def url(self) -> str:
        """The API server's HTTP base URL."""
        return self.api.url

    def replica(self, replica_id: str) -> Replica:
        """The replica called ``replica_id``; KeyError names the known ones."""
        for replica in self.replicas:
            if replica.replica_id == replica_id:
                return replica
        raise KeyError(f"no replica {replica_id!r}; have {[r.replica_id for r in self.replicas]}")

    def describe(self) -> str:
        """Endpoints and capabilities, one line each (what ``anyserve run`` prints)."""
        lines = [f"API server  HTTP {self.api.url}   gRPC {self.api.grpc_endpoint}"]
        for replica in self.replicas:
            caps = "; ".join(
                f"{h.capability}{' (stream)' if h.stream else ''}"
                f"{'' if h.preload else ' (on demand)'}"
                for h in replica.handlers
            )
            metrics = f"  metrics :{replica.metrics_port}" if replica.metrics_port else ""
            lines.append(f"replica {replica.replica_id}  {replica.endpoint}{metrics}  {caps}")
        lines.append(f"object store {self.object_store}")
        return "\n".join(lines)

    def workers_hint(self) -> str:
        """The command that lists a replica's workers, by the replica's id (what
        ``anyserve run`` prints under :meth:`describe`; its ports are random)."""
        if not self.replicas:
            return ""
        return (
            f"workers: anyserve workers list --replica {self.replicas[0].replica_id}"
            f" --api-server {self.url}"
        )


def replica_name(app: str, taken: set[str]) -> str:
    """A readable replica id from an app spec: ``examples.chat_app:app`` -> ``chat_app``."""
    module = app.partition(":")[0]
    base = re.sub(r"\.py$", "", module.replace("\\", "/").split("/")[-1]).split(".")[-1]
    base = re.sub(r"[^A-Za-z0-9_-]", "-", base) or "replica"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    taken.add(name)
    return name


@asynccontextmanager
async def start_cluster(
    apps: Sequence[str],
    *,
    api: ApiServerConfig | None = None,
    object_store: str | None = None,
    replica_options: dict[str, Any] | None = None,
    per_app: Sequence[dict[str, Any]] | None = None,
) -> AsyncIterator[Cluster]:
    """Start an API server and one replica per app; yield once every replica
    has registered. ``replica_options`` apply to every replica, ``per_app`` to
    the replica at the same index. Everything stops (replicas first, workers
    drained) when the block exits.
    """
    async with AsyncExitStack() as stack:
        if object_store is None:
            object_store = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="anyserve-objects-")
            )
        server = await stack.enter_async_context(
            ApiServer(api or ApiServerConfig(port=0, grpc_port=0))
        )
        cluster = Cluster(api=server, object_store=object_store)
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        taken: set[str] = set()
        for index, app in enumerate(apps):
            options: dict[str, Any] = {
                "port": 0,
                "replica_id": replica_name(app, taken),
                "api_server": server.url,
                "object_store": object_store,
                "token": server.config.token,
                "grace": 5.0,
            }
            options.update(replica_options or {})
            if per_app and index < len(per_app):
                options.update(per_app[index])
            replica: Replica = await tg.start(Replica(ReplicaConfig(app=app, **options)).run)
            cluster.replicas.append(replica)
        for replica in cluster.replicas:
            assert replica.registration is not None
            with anyio.fail_after(30):
                await replica.registration.wait_registered()
        yield cluster
