"""The `anyserve` command line against a running system (real subprocesses)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import pytest
from anyio.streams.text import TextReceiveStream

from anyserve.cluster import Cluster
from tests.support import free_port

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


def anyserve(
    *args: str, timeout: float = 60, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anyserve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


async def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    # A thread, so the in-process cluster keeps serving while the CLI runs.
    return await anyio.to_thread.run_sync(lambda: anyserve(*args, input=input))


async def read_until(stream: anyio.abc.ByteReceiveStream, wanted: str, seen: list[str]) -> str:
    """Read lines from ``stream`` into ``seen`` until one contains ``wanted``; return it."""
    pending = ""
    async for text in TextReceiveStream(stream):
        *lines, pending = (pending + text).split("\n")
        seen.extend(lines)
        for line in lines:
            if wanted in line:
                return line
    raise AssertionError(f"never printed {wanted!r}:\n" + "\n".join(seen))


@asynccontextmanager
async def anyserve_process(*args: str) -> AsyncIterator[anyio.abc.Process]:
    """The real ``anyserve`` command; interrupted (Ctrl-C) when the block exits."""
    process = await anyio.open_process(
        [sys.executable, "-m", "anyserve.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            with anyio.move_on_after(15):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()


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
    # dims is INT64 [1]: it decodes to a one-element array and prints as such
    assert "dims: [8]" in done.stdout and "replica: embed_app" in done.stdout


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


# -- servers that are not there: one line, exit code 1 ---------------------------------


def test_a_dead_api_server_is_one_line_for_every_command() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    expected = f"anyserve: Unavailable (503): cannot reach the API server at {url}: "
    for args, given in (
        (("registry",), None),
        (("infer", "-c", "type=embed", "-i", "text=hi"), None),
        (("infer", "-c", "type=chat", "--stream"), None),
        (("infer", "--json", "-"), '{"model_name": "embed", "inputs": []}'),
        (("workers", "list", "--replica", "chat_app"), None),
    ):
        done = anyserve(*args, "--api-server", url, input=given)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)


def test_a_dead_replica_is_one_line_for_every_workers_command() -> None:
    address = f"127.0.0.1:{free_port()}"
    expected = f"anyserve: Unavailable (503): cannot reach the replica at {address}: "
    for args in (("list",), ("start", "type=chat"), ("stop", "chat-0")):
        done = anyserve("workers", *args, "--replica", address)
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)


# -- infer --json ------------------------------------------------------------------------


def text_input(name: str, text: str) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}


async def test_infer_json_sends_a_whole_request_from_a_file(
    cluster: Cluster, tmp_path: Path
) -> None:
    path = tmp_path / "request.json"
    path.write_text(json.dumps({"id": "from-a-file", "inputs": [text_input("text", "hello")]}))
    done = await run_cli(
        "infer", "-c", "type=embed", "--json", str(path), "--api-server", cluster.url
    )
    assert done.returncode == 0, done.stderr
    outputs = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert outputs["source"] == "text" and outputs["replica"] == "embed_app"
    assert set(outputs) == {"dims", "norm", "source", "replica"}


async def test_infer_json_from_stdin_is_routed_by_its_model_name(cluster: Cluster) -> None:
    request = {"model_name": "llama-70b", "inputs": [text_input("text_input", "hi")]}
    done = await run_cli(
        "infer", "--json", "-", "--api-server", cluster.url, input=json.dumps(request)
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "output: Hello, world!"
    # Streamed too, and -c routes it.
    done = await run_cli(
        "infer", "-c", "type=chat", "--stream", "--json", "-", "--api-server", cluster.url,
        input='{"inputs": []}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hello world!"


async def test_infer_json_mistakes_are_one_line(cluster: Cluster, tmp_path: Path) -> None:
    api = ("--api-server", cluster.url)
    embed = ("-c", "type=embed")
    usage = [
        (("--json", "-", *embed), "{not json", "--json stdin: request body is not valid JSON"),
        (("--json", "-", *embed), '{"inputs": 3}', "--json stdin: request needs an 'inputs' array"),
        (("--json", str(tmp_path / "missing.json")), None, "cannot read"),
        (("--json", "-", "-i", "text=hi", *embed), "{}", "give --json or --input, not both"),
        (("--json", "-"), '{"inputs": []}', "say what to run"),
    ]
    for args, given, wanted in usage:
        done = await run_cli("infer", *args, *api, input=given)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("anyserve: Invalid value: "), lines
        assert wanted in lines[0], lines
    # Well formed, refused by the server: its error, one line, exit code 1.
    done = await run_cli("infer", "--json", "-", *api, input='{"model_name": "nope", "inputs": []}')
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("anyserve: NotFound (404): "), lines
    assert "'nope'" in lines[0]


# -- workers --replica by id ---------------------------------------------------------------


def workers_table(listing: str) -> dict[str, list[str]]:
    """``anyserve workers list`` output: worker id -> its cells."""
    return {line.split()[0]: line.split() for line in listing.splitlines()[1:]}


async def test_workers_list_by_replica_id(cluster: Cluster) -> None:
    done = await run_cli("workers", "list", "--replica", "embed_app", "--api-server", cluster.url)
    assert done.returncode == 0, done.stderr
    (embed,) = cluster.replica("embed_app").manager.slots["embed"]
    assert workers_table(done.stdout)["embed-0"][1:4] == ["type=embed", str(embed.pid), "ready"]

    unknown = await run_cli("workers", "list", "--replica", "nope", "--api-server", cluster.url)
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines() == [
        f"anyserve: no replica 'nope' in the registry at {cluster.url};"
        " replicas: chat_app, embed_app"
    ]


async def test_run_prints_each_replicas_id_and_address_and_the_workers_command() -> None:
    seen: list[str] = []
    command = ("run", "examples.embed_app:app", "--port", "0", "--grpc-port", "0")
    async with anyserve_process(*command, "--log-level", "warning") as process:
        assert process.stdout is not None
        with anyio.fail_after(30):
            await read_until(process.stdout, "anyserve is running", seen)
        (replica,) = [line.split() for line in seen if line.startswith("replica ")]
        assert replica[1] == "embed_app" and re.fullmatch(r"127\.0\.0\.1:\d+", replica[2]), seen
        (hint,) = [line for line in seen if line.startswith("workers: ")]
        printed = hint.removeprefix("workers: anyserve ").split()
        assert printed[:4] == ["workers", "list", "--replica", "embed_app"], hint

        by_id, by_address = [
            await run_cli(*printed),
            await run_cli("workers", "list", "--replica", replica[2]),
        ]
    for done in (by_id, by_address):
        assert done.returncode == 0, done.stderr
        assert workers_table(done.stdout)["embed-0"][3] == "ready"
    assert by_id.stdout == by_address.stdout
