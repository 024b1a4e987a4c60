"""The control plane is safe by default, checked with a really remote client:
the API server and the registering client in two network namespaces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.fake_replica import running_api
from tests.hosts import Host, two_hosts

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
PORT = 18080

SERVE = """
import anyio, sys
from anyserve.api_server.server import ApiServer, ApiServerConfig

async def main():
    config = ApiServerConfig(
        host="0.0.0.0", port=int(sys.argv[1]), grpc_port=0,
        token=sys.argv[2] or None, insecure_register=not sys.argv[2],
    )
    async with ApiServer(config):
        print("serving", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""

POST = """
import json, sys, httpx
url, token, body = sys.argv[1], sys.argv[2], sys.argv[3]
headers = {"Authorization": f"Bearer {token}"} if token else {}
response = httpx.post(url, content=body, headers=headers, timeout=10)
print(json.dumps({"status": response.status_code, "body": response.json()}))
"""


def registration(replica_id: str) -> str:
    return json.dumps(
        {"replica_id": replica_id, "endpoint": "10.213.7.2:50051", "capabilities": [{"type": "x"}]}
    )


def post(host: Host, url: str, body: str, token: str = "") -> dict[str, object]:
    done = subprocess.run(
        host.command([sys.executable, "-c", POST, url, token, body]),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


@contextmanager
def api_server_in(host: Host, token: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        host.command([sys.executable, "-c", SERVE, str(PORT), token]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until it serves or dies
        assert line.strip() == "serving", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_without_a_token_only_this_machine_may_register() -> None:
    with two_hosts(subnet=7) as (server, client), api_server_in(server, token=""):
        remote = f"http://{server.address}:{PORT}"
        refused = post(client, f"{remote}/register", registration("intruder"))
        assert refused["status"] == 401
        assert "from this machine only" in str(refused["body"])
        unregister = post(client, f"{remote}/unregister", json.dumps({"replica_id": "x"}))
        assert unregister["status"] == 401
        # The same request from the server's own host is a local replica: accepted.
        local = post(server, f"http://127.0.0.1:{PORT}/register", registration("local"))
        assert local["status"] == 200, local
        # Inference stays reachable from the other host.
        health = post(client, f"{remote}/infer", json.dumps({"inputs": []}))
        assert health["status"] == 400  # reached the server: it asks what to run


def test_with_a_token_a_remote_replica_registers_and_the_registry_hides_endpoints() -> None:
    token = "s3cret-token"
    with two_hosts(subnet=8) as (server, client), api_server_in(server, token=token):
        remote = f"http://{server.address}:{PORT}"
        assert post(client, f"{remote}/register", registration("r1"))["status"] == 401
        accepted = post(client, f"{remote}/register", registration("r1"), token=token)
        assert accepted["status"] == 200, accepted
        # /registry: endpoints only for callers with the token.
        script = (
            "import httpx, json, sys; h = {'Authorization': 'Bearer ' + sys.argv[2]} "
            "if sys.argv[2] else {}; print(json.dumps(httpx.get(sys.argv[1], headers=h).json()))"
        )
        for given, shows in (("", False), (token, True)):
            done = subprocess.run(
                client.command([sys.executable, "-c", script, f"{remote}/registry", given]),
                capture_output=True, text=True, timeout=30, cwd=ROOT,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            entry = json.loads(done.stdout)["replicas"][0]
            assert entry["replica_id"] == "r1"
            assert ("endpoint" in entry) is shows


async def test_registrations_are_checked_and_bounded() -> None:
    async with running_api() as api, httpx.AsyncClient(base_url=api.url) as http:
        bad = {"replica_id": "r", "capabilities": [{"type": "x"}]}
        for endpoint in ("unix:/x", "unix:///run/x.sock", "http://127.0.0.1:5", "127.0.0.1"):
            response = await http.post("/register", json={**bad, "endpoint": endpoint})
            assert response.status_code == 400, (endpoint, response.text)
            assert "host:port" in response.json()["error"]
        many = [{"type": f"t{i}"} for i in range(257)]
        body = {"replica_id": "r", "endpoint": "127.0.0.1:5", "capabilities": many}
        response = await http.post("/register", json=body)
        assert response.status_code == 400 and "256" in response.json()["error"]
        registry = await http.get("/registry")
        assert registry.json() == {"replicas": []}  # nothing got in


def test_refusing_a_public_address_without_a_token_is_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "anyserve.cli", "api-server", "--host", "0.0.0.0",
         "--port", "0", "--grpc-port", "0"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
        env={**os.environ, "ANYSERVE_TOKEN": ""},
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "refusing to serve on 0.0.0.0 without a token" in lines[0]


def test_the_cli_flags_reach_the_api_server() -> None:
    env = {**os.environ, "ANYSERVE_TOKEN": ""}
    cli = [sys.executable, "-m", "anyserve.cli", "api-server", "--port", "0", "--grpc-port", "0"]
    bad = subprocess.run(
        [*cli, "--replica-networks", "10.0.0.0/8,not-a-net"],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "anyserve: Invalid value: not a network (CIDR): 'not-a-net'"
        " (see `anyserve api-server --help`)"
    ]
    proc = subprocess.Popen(
        [*cli, "--host", "0.0.0.0", "--insecure-register"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # its log: it starts, and says what it allows
            seen.append(line)
            if "without a token (--insecure-register)" in line:
                break
        else:
            raise AssertionError(f"no start-up warning: {seen}")
        assert any("anyserve API server: HTTP on" in line for line in seen)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
