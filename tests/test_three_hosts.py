"""Three hosts, three network stacks, no shared object directory.

An API server, a ``front`` (chat) replica and a ``back`` (embed) replica, each in a
network namespace of its own (tests/hosts.py), the replicas binding 0.0.0.0 and
advertising their namespace addresses, each with its OWN object directory. Routing,
delegation, streaming and a ``context.call`` carrying an object reference all work,
and the object crosses hosts by peer fetch: afterwards it is a file in ``back``'s
directory with the bytes ``front`` wrote.

The requests are sent from inside the API server's namespace: this module is also the
driver (``python -m tests.test_three_hosts URL FRONT``), run there with ``ip netns
exec``; it prints what it saw as JSON and the test checks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

from anyserve import codec
from anyserve.objects import HEADER_LEN
from anyserve.proto import ModelInferRequest
from anyserve.testing import GrpcClient
from tests.api_calls import (
    CHAT,
    EMBED,
    infer,
    outputs,
    pb_served_by,
    served_by,
    stream_events,
    text_body,
    tokens,
)
from tests.hosts import Host, hosts

ROOT = Path(__file__).resolve().parent.parent
ANYSERVE = str(ROOT / ".venv" / "bin" / "anyserve")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
TOKEN = "three-hosts-token"
HTTP_PORT, GRPC_PORT, REPLICA_PORT = 18080, 18081, 50051
OBJECT_SIZE = 1_500_000  # two 1 MiB transfer chunks
DEADLINE = 20.0


# --------------------------------------------------------------------------- the driver


async def drive(url: str, front: str) -> dict[str, Any]:
    """Wait for both replicas, then send one request of each kind; what came back."""
    seen: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as http:
        deadline = time.monotonic() + DEADLINE
        ids: list[str] | str = "none (the API server is not up)"
        while True:  # readiness: the registry, polled with a deadline
            try:
                registry = (await http.get("/registry")).json()
                ids = sorted(r["replica_id"] for r in registry["replicas"])
            except httpx.TransportError:
                pass  # the API server is still starting
            if ids == ["back", "front"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicas registered: {ids}")
            await anyio.sleep(0.05)
        routed = await infer(http, EMBED, text_body("text", "hello"))
        seen["routed"] = {"by": served_by(routed), **outputs(routed)}
        events = await stream_events(http, "/infer/stream", CHAT, text_body("text", "go"))
        seen["streamed"] = tokens(events)
        piped = await infer(http, CHAT, text_body("size", str(OBJECT_SIZE)))
        seen["object"] = outputs(piped)
    async with GrpcClient(front) as client:  # front has no embed: it delegates
        request = ModelInferRequest(id="d", inputs=[codec.encode_input("text", "via front")])
        answer = await client.infer(request, capability={"type": "embed"}, timeout=DEADLINE)
    seen["delegated"] = {"by": pb_served_by(answer), **codec.decode_outputs(answer)}
    seen["delegated"]["echo"] = seen["delegated"]["echo"].decode()
    return seen


# --------------------------------------------------------------------------- the test


@contextmanager
def process_in(host: Host, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            host.command(argv), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "ANYSERVE_TOKEN": TOKEN},
        )  # fmt: skip
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def replica(name: str, app: str, host: Host, api: Host, store: Path) -> list[str]:
    return [
        ANYSERVE, "start", "--app", f"tests/apps/hosts_app.py:{app}", "--replica-id", name,
        "--host", "0.0.0.0", "--port", str(REPLICA_PORT),
        "--advertise", f"{host.address}:{REPLICA_PORT}",
        "--api-server", f"http://{api.address}:{HTTP_PORT}", "--object-store", str(store),
    ]  # fmt: skip


def test_three_hosts_route_delegate_stream_and_fetch_objects(tmp_path: Path) -> None:
    with hosts(subnet=11, n=3) as (api, one, two), ExitStack() as running:
        stores = {"front": tmp_path / "objects-front", "back": tmp_path / "objects-back"}
        logs = {name: tmp_path / f"{name}.log" for name in ("api", "front", "back")}
        server = [ANYSERVE, "api-server", "--host", "0.0.0.0", "--port", str(HTTP_PORT),
                  "--grpc-port", str(GRPC_PORT)]  # fmt: skip
        running.enter_context(process_in(api, server, logs["api"]))
        running.enter_context(
            process_in(one, replica("front", "front", one, api, stores["front"]), logs["front"])
        )
        running.enter_context(
            process_in(two, replica("back", "back", two, api, stores["back"]), logs["back"])
        )
        driver = [PYTHON, "-m", "tests.test_three_hosts", f"http://{api.address}:{HTTP_PORT}",
                  f"{one.address}:{REPLICA_PORT}"]  # fmt: skip
        done = subprocess.run(
            api.command(driver), capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE + 10
        )
        if done.returncode != 0:
            running.close()  # stop everything so that the logs are complete
            found = "\n".join(f"--- {n}\n{p.read_text()[-3000:]}" for n, p in logs.items())
            raise AssertionError(f"driver failed:\n{done.stderr[-3000:]}\n{found}")
        seen = json.loads(done.stdout)

    assert seen["routed"] == {"by": "back", "echo": "hello"}
    assert seen["streamed"] == ["one", "two", "three"]
    assert seen["delegated"] == {"by": "back", "echo": "via front"}
    got = seen["object"]
    assert got["size"] == OBJECT_SIZE
    assert got["sha256"] == got["created_sha256"]  # back read what front wrote
    name = f"{got['object_ref']}.bin"
    original, fetched = stores["front"] / name, stores["back"] / name
    assert fetched.is_file(), sorted(os.listdir(stores["back"]))
    assert fetched.read_bytes() == original.read_bytes()
    payload = fetched.read_bytes()[HEADER_LEN:]
    assert hashlib.sha256(payload).hexdigest() == got["created_sha256"]


if __name__ == "__main__":
    print(json.dumps(anyio.run(drive, sys.argv[1], sys.argv[2])))
