"""Shared pytest configuration: every async test runs on asyncio (anyio's plugin).

The backend fixture is session-scoped so module-scoped async fixtures (a replica
shared by a test module) can use it.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
