"""The pytest plugin (anyserve.testing) as a user's project meets it.

Each test here writes a small throwaway project (an app module at its root, a
test module under ``tests/`` that overrides ``anyserve_apps`` and takes
``anyserve_cluster`` and ``anyserve_client``) and runs pytest on it in a
subprocess, which gets the plugin from the installed package's ``pytest11``
entry point as any project would. The app specs must resolve against pytest's
rootdir wherever pytest is started from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

APP = """\
from anyserve import AnyServe, codec

app = AnyServe("greet")


@app.capability(type="greet")
def greet(request, context):
    return {"greeting": "hello " + codec.input_text(request, "name")}
"""

TEST = """\
import pytest

from anyserve import codec


@pytest.fixture
def anyserve_apps():
    return ["greet_app:app"]


@pytest.mark.anyio
async def test_greet(anyserve_cluster, anyserve_client):
    assert [r.replica_id for r in anyserve_cluster.replicas] == ["greet_app"]
    assert anyserve_cluster.replica("greet_app").endpoint.startswith("127.0.0.1:")
    assert anyserve_cluster.url.startswith("http://127.0.0.1:")
    assert anyserve_cluster.api.grpc_endpoint.startswith("127.0.0.1:")
    assert anyserve_client.base_url == anyserve_cluster.url
    response = await anyserve_client.infer({"type": "greet"}, {"name": "pytest"})
    assert codec.decode_outputs(response)["greeting"] == b"hello pytest"
"""

PYPROJECT = """\
[project]
name = "greeter"
version = "0"

[tool.pytest.ini_options]
testpaths = ["tests"]
"""


def make_project(root: Path, *, pyproject: bool) -> Path:
    project = root / "greeter"
    (project / "tests").mkdir(parents=True)
    (project / "greet_app.py").write_text(APP)
    (project / "tests" / "test_greet.py").write_text(TEST)
    if pyproject:
        (project / "pyproject.toml").write_text(PYPROJECT)
    return project


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.pop("PYTHONPATH", None)  # only the installed package, as in a user's project
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("where", "pyproject"),
    [
        ("the project directory", True),
        ("another directory, the project as argument", True),
        ("another directory, --rootdir", False),
    ],
)
def test_the_plugin_serves_the_projects_apps(tmp_path: Path, where: str, pyproject: bool) -> None:
    project = make_project(tmp_path, pyproject=pyproject)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if where == "the project directory":
        done = run_pytest(project)
    elif pyproject:
        done = run_pytest(elsewhere, str(project))
    else:
        done = run_pytest(elsewhere, f"--rootdir={project}", str(project / "tests"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout, done.stdout


def test_a_project_that_names_no_apps_is_told_how(tmp_path: Path) -> None:
    project = make_project(tmp_path, pyproject=True)
    test = project / "tests" / "test_greet.py"
    test.write_text(test.read_text().replace('["greet_app:app"]', "[]"))
    done = run_pytest(project)
    assert done.returncode != 0
    assert "override the anyserve_apps fixture" in done.stdout + done.stderr
