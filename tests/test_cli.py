"""The `anyserve` command line against a running system (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio.to_thread
import pytest

from anyserve.cluster import Cluster

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def anyserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anyserve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    # A thread, so the in-process cluster keeps serving while the CLI runs.
    return await anyio.to_thread.run_sync(lambda: anyserve(*args))


@pytest.fixture
def anyserve_apps() -> list[str]:
    return ["examples.chat_app:app", "examples.embed_app:app"]


@pytest.fixture
def cluster(anyserve_cluster: Cluster) -> Cluster:
    """The plugin's cluster fixture (anyserve.testing), as users would use it."""
    return anyserve_cluster


async def test_infer_prints_outputs(cluster: Cluster) -> None:
    done = await run_cli(
        "infer", "-c", "type=embed", "-i", "text=hello", "--api-server", cluster.url
    )
    assert done.returncode == 0, done.stderr
    assert "dims: 8" in done.stdout and "replica: embed_app" in done.stdout


async def test_infer_stream_prints_tokens(cluster: Cluster) -> None:
    done = await run_cli("infer", "-c", "type=chat", "--stream", "--api-server", cluster.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hello world!"


async def test_infer_error_is_clear(cluster: Cluster) -> None:
    done = await run_cli("infer", "-c", "type=nothing", "--api-server", cluster.url)
    assert done.returncode == 1
    assert "404" in done.stderr and "type=nothing" in done.stderr
    bad = await run_cli("infer", "-c", "type", "--api-server", cluster.url)
    assert bad.returncode == 2 and "key=value" in bad.stderr


async def test_registry_table(cluster: Cluster) -> None:
    done = await run_cli("registry", "--api-server", cluster.url)
    assert done.returncode == 0, done.stderr
    assert "chat_app" in done.stdout and "embed_app" in done.stdout
    assert "loaded    type=embed" in done.stdout
    assert "worker embed-0" in done.stdout


def test_help_explains_every_command() -> None:
    done = anyserve("--help")
    assert done.returncode == 0
    for command in ("run", "start", "api-server", "workers", "infer", "registry"):
        assert command in done.stdout


def test_version_flag_and_command_print_the_installed_version() -> None:
    import anyserve as package

    for args in (("--version",), ("version",)):
        done = anyserve(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"anyserve {package.__version__}"


LEVELS_PROBE = """
import logging, sys
from anyserve.cli.options import setup_logging
given = setup_logging(sys.argv[1])
print(given, logging.getLogger("anyserve").getEffectiveLevel(),
      logging.getLogger("httpcore").getEffectiveLevel())
"""


@pytest.mark.parametrize(
    ("level", "expected"),
    [("DEBUG", "debug 10 30"), ("trace", "debug 10 10"), ("info", "info 20 30")],
)
def test_log_levels_keep_library_lines_out_unless_trace(level: str, expected: str) -> None:
    # A fresh interpreter: logging is configured once per process.
    done = subprocess.run(
        [sys.executable, "-c", LEVELS_PROBE, level], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == expected.split()


def test_an_unknown_log_level_is_one_clear_line() -> None:
    done = anyserve("api-server", "--log-level", "verbose", "--port", "0")
    assert done.returncode != 0
    text = " ".join(done.stderr.replace("│", " ").split())  # rich boxes and wraps
    assert "--log-level must be one of trace, debug, info, warning, error, not 'verbose'" in text
