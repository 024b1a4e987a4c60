"""Shared pytest configuration: every async test runs on asyncio (anyio's plugin).

The backend fixture is session-scoped so module- and session-scoped async
fixtures (a replica or a cluster shared by tests) can use it.

The end-to-end modules (``tests/test_e2e_*.py``) share three clusters, each an
API server and real replicas with real worker processes, started once per
session on first use (starting workers is the slow part):

* ``seed``: exactly the README's ``chat_app`` and ``embed_app`` (seed
  scenario 1). Default settings.
* ``bench``: ``forms_app`` (every handler form, misbehaving ones included),
  ``heavy_app`` (a delegation target) and ``chat_app`` (a replica that serves
  neither, for stale routes). Default settings.
* ``randomly``: ``stream_app`` (seed scenario 4) and ``heavy_app`` with
  ``no_match="random"`` (seed scenario 2's policy).

They are session-scoped because tests in several modules use them and none
changes them: the tests only send requests (no registration, unregistration
or process kill; a cancelled stream stops only its own call). A test that
changes a cluster's registry or kills something uses a cluster of its own
(``routing`` in tests/test_e2e_routing.py, or its own processes).

anyserve is imported inside the fixtures so that a module of it that does not
import does not stop the whole session from collecting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from anyserve.cluster import Cluster


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def seed() -> AsyncIterator[Cluster]:
    from anyserve.api_server.config import ApiServerConfig
    from anyserve.cluster import start_cluster

    apps = ["examples.chat_app:app", "examples.embed_app:app"]
    async with start_cluster(apps, api=ApiServerConfig(port=0, grpc_port=0, token=None)) as c:
        yield c


@pytest.fixture(scope="session")
async def bench() -> AsyncIterator[Cluster]:
    from anyserve.api_server.config import ApiServerConfig
    from anyserve.cluster import start_cluster

    apps = ["tests.apps.forms_app:app", "examples.heavy_app:app", "examples.chat_app:app"]
    async with start_cluster(apps, api=ApiServerConfig(port=0, grpc_port=0, token=None)) as c:
        yield c


@pytest.fixture(scope="session")
async def randomly() -> AsyncIterator[Cluster]:
    from anyserve.api_server.config import ApiServerConfig
    from anyserve.cluster import start_cluster

    config = ApiServerConfig(port=0, grpc_port=0, token=None, no_match="random")
    async with start_cluster(
        ["examples.stream_app:app", "examples.heavy_app:app"], api=config
    ) as cluster:
        yield cluster
