"""The deployment files against the code they run: ``Dockerfile``,
``.dockerignore`` and the Kubernetes manifests in ``deploy/kubernetes/``.

No cluster and no image build: every container command is parsed by the
``anyserve`` CLI itself (its Typer app's click command, ``make_context``, after
``$(VAR)`` references are expanded from the container's env with sample values
for the downward API and Secrets), the API server's settings are built as
``anyserve api-server`` builds them, probe paths are requested from the API
server's real Starlette app, and the ports, Service names and URLs that tie the
parts together are checked against each other.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from starlette.testclient import TestClient

from anyserve.api_server.app import build_app
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.state import ApiState
from anyserve.app import load_app
from anyserve.cli import app as cli_app
from anyserve.cli.serving import _api_config

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = "anyserve"  # the image `docker build -t anyserve .` makes

# What the kubelet would put in downward-API and Secret env vars.
SAMPLE_FIELDS = {"status.podIP": "10.244.1.17", "metadata.name": "anyserve-replica-chat-7d9c"}
SAMPLE_SECRET = "sample-secret-token"
TOKEN_ENV = "ANYSERVE_TOKEN"
# Typer's click raises UsageError (the base of the public typer.BadParameter) for
# an unknown flag or a bad value.
USAGE_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError"
)


# -- reading the manifests ----------------------------------------------------------


def documents() -> list[dict[str, Any]]:
    """Every YAML document of deploy/kubernetes/*.yaml (empty ones skipped)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
                docs.append(doc)
    return docs


def find(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class Container:
    """One container of a Deployment's pod template."""

    deployment: str
    pod: dict[str, Any]
    spec: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.deployment}/{self.spec['name']}"


def containers() -> Iterator[Container]:
    for doc in documents():
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            for spec in pod["containers"]:
                yield Container(doc["metadata"]["name"], pod, spec)


def anyserve_containers() -> list[Container]:
    return [c for c in containers() if c.spec["image"].split(":")[0] == IMAGE]


def one_running(command: str) -> Container:
    """The one anyserve container whose command is ``command`` (``start``...)."""
    found = [c for c in anyserve_containers() if c.spec["args"][0] == command]
    assert len(found) == 1, f"expected one container running `anyserve {command}`"
    return found[0]


def container_env(container: Container) -> dict[str, str]:
    """The container's env as the kubelet would set it, with sample values for
    the downward API and Secrets."""
    env: dict[str, str] = {}
    for item in container.spec.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in SAMPLE_FIELDS, f"{container.label}: no sample value for {path}"
            env[item["name"]] = SAMPLE_FIELDS[path]
        elif "secretKeyRef" in source:
            env[item["name"]] = SAMPLE_SECRET
        else:
            raise AssertionError(f"{container.label}: env {item['name']} from {source}")
    return env


def expand(arg: str, env: dict[str, str], label: str) -> str:
    """Kubernetes' ``$(VAR)`` expansion in args; a reference to a variable the
    container does not define would be passed on literally, so it fails here."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"{label}: $({name}) is not in the container's env"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, arg)


@dataclass(frozen=True)
class Parsed:
    command: str
    params: dict[str, Any]


def parse(container: Container, monkeypatch: pytest.MonkeyPatch) -> Parsed:
    """The container's command line parsed by the anyserve CLI, with its env in
    ``os.environ`` (options such as ``--token`` read ``ANYSERVE_TOKEN``).
    Raises typer's UsageError (a click exception) for a bad command line."""
    spec = container.spec
    # The image's entry point is `anyserve`: a container must not replace it.
    assert spec.get("command") in (None, ["anyserve"]), f"{container.label}: command"
    env = container_env(container)
    args = [expand(str(a), env, container.label) for a in spec["args"]]
    monkeypatch.delenv(TOKEN_ENV, raising=False)  # only the container's own env counts
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    group = typer.main.get_command(cli_app)
    assert isinstance(group, typer.core.TyperGroup)
    assert not args[0].startswith("-"), f"{container.label}: args must start with a command"
    ctx = group.make_context("anyserve", list(args), resilient_parsing=False)
    name, command, rest = group.resolve_command(ctx, list(args))
    assert name is not None and command is not None
    sub = command.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return Parsed(name, dict(sub.params))


def container_port(container: Container, ref: int | str) -> int:
    """The port number a probe or Service ``targetPort`` (name or number) means."""
    for port in container.spec["ports"]:
        if ref in (port["containerPort"], port.get("name")):
            return int(port["containerPort"])
    raise AssertionError(f"{container.label} has no port {ref!r}")


def service_port(service: dict[str, Any], name: str) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [p for p in service["spec"]["ports"] if p.get("name") == name]
    assert len(ports) == 1, f"Service {service['metadata']['name']} has no port {name!r}"
    return ports[0]


def service_for(container: Container) -> dict[str, Any]:
    """The Service whose selector picks this container's pods."""
    labels = next(
        d["spec"]["template"]["metadata"]["labels"]
        for d in documents()
        if d["kind"] == "Deployment" and d["metadata"]["name"] == container.deployment
    )
    found = [
        d
        for d in documents()
        if d["kind"] == "Service" and d["spec"]["selector"].items() <= labels.items()
    ]
    assert len(found) == 1, f"expected one Service selecting {container.deployment}"
    return found[0]


# -- the manifests --------------------------------------------------------------------


def test_manifests_parse_and_each_selector_picks_its_pods() -> None:
    docs = documents()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "redis"), ("Service", "redis")} <= kinds
    assert {("Deployment", "anyserve-api"), ("Service", "anyserve-api")} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc.get("metadata")
        if doc["kind"] == "Deployment":
            selector = doc["spec"]["selector"]["matchLabels"]
            labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), doc["metadata"]["name"]
    for service in (d for d in docs if d["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert find("Deployment", name), name  # each Service fronts its Deployment
    assert find("Deployment", "anyserve-api")["spec"]["replicas"] == 2


@pytest.mark.parametrize("container", anyserve_containers(), ids=lambda c: c.label)
def test_every_command_line_is_one_the_cli_accepts(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = parse(container, monkeypatch)
    assert parsed.command in ("api-server", "start")
    # Every server binds all interfaces: probes and other pods reach it by pod IP.
    assert parsed.params["host"] == "0.0.0.0"
    # The shared secret comes from a Secret, never from the manifest itself.
    assert parsed.params["token"] == SAMPLE_SECRET
    assert not any("--token" in str(a) for a in container.spec["args"])


def test_a_bad_command_line_fails_to_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    """parse() is a real check: the CLI refuses an unknown flag and a bad value."""
    api = one_running("api-server")
    for bad in (["--no-such-flag"], ["--port=http"]):
        broken = Container(api.deployment, api.pod, {**api.spec, "args": ["api-server", *bad]})
        with pytest.raises(USAGE_ERROR):
            parse(broken, monkeypatch)


def test_the_api_server_accepts_its_settings_only_with_the_secret_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = one_running("api-server")
    config = _api_config(parse(api, monkeypatch).params)  # as `anyserve api-server` builds it
    assert config.token == SAMPLE_SECRET
    without = {**api.spec, "env": [e for e in api.spec["env"] if e["name"] != TOKEN_ENV]}
    params = parse(Container(api.deployment, api.pod, without), monkeypatch).params
    with pytest.raises(typer.BadParameter, match="without a token"):
        _api_config(params)


def test_api_server_ports_and_service_match_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    api = one_running("api-server")
    params = parse(api, monkeypatch).params
    service = service_for(api)
    assert service["metadata"]["name"] == "anyserve-api"
    for name, flag in (("http", "port"), ("grpc", "grpc_port")):
        port = service_port(service, name)
        assert container_port(api, port["targetPort"]) == params[flag], name
        assert container_port(api, name) == params[flag], name
    # The API server tells replicas its gRPC entry as <the host they reached>:<its
    # own port>, so through the Service that port must be the same number.
    assert service_port(service, "grpc")["port"] == params["grpc_port"]


def test_probes_are_routes_the_api_server_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    api = one_running("api-server")
    params = parse(api, monkeypatch).params
    probes = {kind: api.spec[kind]["httpGet"] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == "/v2/health/live"
    state = ApiState(ApiServerConfig(port=0, grpc_port=0, token=SAMPLE_SECRET))
    client = TestClient(build_app(state))
    for kind, probe in probes.items():
        assert container_port(api, probe["port"]) == params["port"], kind
        response = client.get(probe["path"])
        assert response.status_code == 200, (kind, response.text)
    assert client.get("/v2/health/not-a-route").status_code == 404  # the check can fail


def test_the_registry_is_the_redis_service(monkeypatch: pytest.MonkeyPatch) -> None:
    url = urlsplit(parse(one_running("api-server"), monkeypatch).params["registry"])
    redis = find("Service", "redis")
    assert url.scheme == "redis"
    assert url.hostname == redis["metadata"]["name"]
    assert url.port == service_port(redis, "redis")["port"]
    redis_container = next(c for c in containers() if c.deployment == "redis")
    target = service_port(redis, "redis")["targetPort"]
    assert container_port(redis_container, target) == url.port


def test_the_replica_registers_with_the_api_service_and_advertises_its_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replica = one_running("start")
    params = parse(replica, monkeypatch).params
    api_params = parse(one_running("api-server"), monkeypatch).params
    service = service_for(one_running("api-server"))
    url = urlsplit(params["api_server"])
    assert (url.scheme, url.hostname) == ("http", service["metadata"]["name"])
    assert url.port == service_port(service, "http")["port"] == api_params["port"]
    # The pod IP from the downward API, on the port the replica binds and declares.
    assert params["advertise"] == f"{SAMPLE_FIELDS['status.podIP']}:{params['port']}"
    assert container_port(replica, "grpc") == params["port"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        if kind in replica.spec:
            assert (
                container_port(replica, replica.spec[kind]["tcpSocket"]["port"]) == (params["port"])
            )
    secrets = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in anyserve_containers()
        for e in c.spec["env"]
        if e["name"] == TOKEN_ENV
    }
    assert len(secrets) == 1, f"API servers and replicas must share one token: {secrets}"


def test_the_replica_app_is_in_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse(one_running("start"), monkeypatch).params["app_spec"]
    assert load_app(spec, str(ROOT)).handlers, spec  # it imports and serves something
    package = spec.split(":")[0].split(".")[0]
    workdir = dockerfile_values("WORKDIR")[-1]
    assert f"COPY {package} ./{package}" in dockerfile_instructions(), "app not in the image"
    assert workdir == "/app"


def test_pods_outlive_their_drain_and_have_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    for container in anyserve_containers():
        grace = parse(container, monkeypatch).params["grace"]
        pre_stop = container.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        sleep = float(pre_stop["command"][1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        assert container.pod["terminationGracePeriodSeconds"] > sleep + grace, container.label
    for container in containers():
        resources = container.spec["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources[bound].keys(), (container.label, bound)


# -- the Dockerfile -------------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(" ".join((pending + line).split()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continuation"
    return lines


def final_stage() -> list[str]:
    """The instructions of the last stage (the image that runs)."""
    lines = dockerfile_instructions()
    start = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    return lines[start:]


def dockerfile_values(keyword: str) -> list[str]:
    prefix = keyword.upper() + " "
    return [line[len(prefix) :] for line in final_stage() if line.upper().startswith(prefix)]


def test_the_image_runs_anyserve_as_a_user_on_slim_python_311() -> None:
    assert final_stage()[0].split()[1].startswith("python:3.11-slim")
    (entrypoint,) = dockerfile_values("ENTRYPOINT")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert json.loads(entrypoint) == ["anyserve"] and "anyserve" in scripts
    user = dockerfile_values("USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    for container in anyserve_containers():  # the manifests run it as that user
        assert str(container.pod["securityContext"]["runAsUser"]) == user, container.label
    installs = [v for v in dockerfile_values("RUN") if "pip install" in v]
    words = [w.strip("\"'") for v in installs for w in shlex.split(v)]
    extras = {e for w in words if w.startswith("anyserve[") for e in w[9:-1].split(",")}
    assert {"fast", "redis"} <= extras, installs
    assert not any(tool in words for tool in ("pytest", "mypy", "ruff", ".[dev]"))
    exposed = {int(p) for v in dockerfile_values("EXPOSE") for p in v.split()}
    declared = {p["containerPort"] for c in anyserve_containers() for p in c.spec["ports"]}
    assert declared <= exposed


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "**/__pycache__", ".mypy_cache", ".pytest_cache"} <= ignored
