"""Test helpers: in-process replicas and API servers on port 0, and gRPC clients.

Installing anyserve registers this module as a pytest plugin (entry point
``pytest11``), which provides these fixtures for anyio tests:

* ``anyserve_apps`` - the apps to serve (override it in your test module or
  conftest.py), as ``module:attr`` specs like ``anyserve run`` takes;
* ``anyserve_app_dir`` - where those specs resolve: pytest's rootdir (the
  directory of your pyproject.toml / pytest.ini), wherever pytest was started
  from; override it to serve apps from elsewhere;
* ``anyserve_cluster`` - a running :class:`~anyserve.cluster.Cluster` of those
  apps: API server, one replica per app with real worker processes, and a
  temporary object store, all on free local ports;
* ``anyserve_client`` - an :class:`~anyserve.client.Client` connected to that
  cluster's API server::

    @pytest.fixture
    def anyserve_apps() -> list[str]:
        return ["my_app:app"]

    @pytest.mark.anyio
    async def test_chat(anyserve_client):
        response = await anyserve_client.infer({"type": "chat"}, {"text_input": "hi"})

The helpers below work in any anyio-based test too::

    async with start_replica("my_app:app") as replica:
        async with GrpcClient(replica.endpoint) as client:
            response = await client.infer(request, capability={"type": "chat"})

Replicas and API servers run in the test's event loop; workers are real
processes. Everything binds 127.0.0.1 on free ports.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import grpc
import grpc.aio
import pytest

from anyserve import rpc
from anyserve.capability import query_to_metadata
from anyserve.client import Client
from anyserve.cluster import Cluster, start_cluster
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse
from anyserve.replica.server import Replica, ReplicaConfig


@asynccontextmanager
async def start_replica(app: str, **options: Any) -> AsyncIterator[Replica]:
    """Run a replica for ``app`` on a free port until the block exits.

    ``options`` are ReplicaConfig fields (``api_server``, ``object_store``,
    ``resources``, ...). Yields once the preloaded workers are ready.
    """
    options.setdefault("port", 0)
    options.setdefault("object_store", None)
    options.setdefault("grace", 2.0)
    async with anyio.create_task_group() as tg:
        replica: Replica = await tg.start(Replica(ReplicaConfig(app=app, **options)).run)
        try:
            yield replica
        finally:
            tg.cancel_scope.cancel()


class GrpcClient:
    """A small KServe v2 gRPC client (typed messages, capability metadata)."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint, options=rpc.grpc_options())
        self._infer = self.channel.unary_unary(
            rpc.MODEL_INFER,
            request_serializer=ModelInferRequest.SerializeToString,
            response_deserializer=ModelInferResponse.FromString,
        )
        self._stream = self.channel.stream_stream(
            rpc.MODEL_STREAM_INFER,
            request_serializer=ModelInferRequest.SerializeToString,
            response_deserializer=ModelStreamInferResponse.FromString,
        )

    async def __aenter__(self) -> GrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    @staticmethod
    def _metadata(
        capability: Mapping[str, str] | None, metadata: Iterable[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        return [*query_to_metadata(capability or {}), *metadata]

    async def infer(
        self,
        request: ModelInferRequest,
        *,
        capability: Mapping[str, str] | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        timeout: float | None = 30.0,
    ) -> ModelInferResponse:
        """One ModelInfer call; raises grpc.aio.AioRpcError on a non-OK status."""
        response: ModelInferResponse = await self._infer(
            request, metadata=self._metadata(capability, metadata), timeout=timeout
        )
        return response

    def stream(
        self,
        *requests: ModelInferRequest,
        capability: Mapping[str, str] | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        timeout: float | None = 30.0,
    ) -> Any:
        """A ModelStreamInfer call sending ``requests`` then half-closing; iterate
        it for ModelStreamInferResponse messages, ``.cancel()`` it to hang up."""
        return self._stream(
            iter(requests), metadata=self._metadata(capability, metadata), timeout=timeout
        )


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until it is true; raises TimeoutError after ``timeout``.

    For conditions that live in another process (a file a worker writes, a
    registry entry), where no event can be awaited.
    """
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - the condition lives in another process
            await anyio.sleep(interval)


@pytest.fixture
def anyserve_apps() -> list[str]:
    """The apps ``anyserve_cluster`` serves; override this fixture to choose them."""
    return []


@pytest.fixture
def anyserve_app_dir(request: pytest.FixtureRequest) -> Path:
    """Where ``anyserve_apps`` specs resolve (first on ``sys.path`` in the
    worker processes): pytest's rootdir, not the directory pytest was started
    in. Override it to serve apps from elsewhere (a relative path is taken
    from the rootdir)."""
    return request.config.rootpath


@pytest.fixture
async def anyserve_cluster(
    anyserve_apps: list[str], anyserve_app_dir: str | Path, request: pytest.FixtureRequest
) -> AsyncIterator[Cluster]:
    """A running local cluster of ``anyserve_apps`` (stopped after the test)."""
    if not anyserve_apps:
        raise pytest.UsageError("override the anyserve_apps fixture to name the apps to serve")
    # A relative anyserve_app_dir is taken from the rootdir too, never the cwd.
    options = {"app_dir": str(request.config.rootpath / anyserve_app_dir)}
    async with start_cluster(anyserve_apps, replica_options=options) as cluster:
        yield cluster


@pytest.fixture
async def anyserve_client(anyserve_cluster: Cluster) -> AsyncIterator[Client]:
    """A :class:`~anyserve.client.Client` of ``anyserve_cluster``'s API server."""
    async with Client(anyserve_cluster.url) as client:
        yield client
