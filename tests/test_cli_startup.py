"""Every expected start-up failure is one clear line (plus the user's own
traceback when it is their code) and a non-zero exit: real subprocesses."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD_APP = """\
print("loading the model")  # an app that prints at import must not break start-up
from anyserve import AnyServe
app = AnyServe()

@app.capability(type="x")
def handler(request, context):
    return "x"
"""

BROKEN_APP = """\
from anyserve import AnyServe


def load_weights():
    raise FileNotFoundError("weights.bin is missing")


load_weights()
app = AnyServe()
"""


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    (tmp_path / "good_app.py").write_text(GOOD_APP)
    (tmp_path / "broken_app.py").write_text(BROKEN_APP)
    return tmp_path


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def anyserve(cwd: Path, *args: str) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "anyserve.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr.strip().splitlines()


def test_a_missing_app_module_is_one_line(apps: Path) -> None:
    code, lines = anyserve(apps, "start", "--app", "no_such_module:app", "--port", "0")
    assert code == 1
    assert lines == [
        "anyserve: cannot import app 'no_such_module:app': No module named 'no_such_module'"
    ]


def test_a_missing_attribute_is_one_line(apps: Path) -> None:
    code, lines = anyserve(apps, "start", "--app", "good_app:nope", "--port", "0")
    assert code == 1
    assert lines == [
        "loading the model",  # the app's own print, on stderr
        "anyserve: cannot load app 'good_app:nope': module 'good_app' has no attribute 'nope'",
    ]


def test_an_app_that_raises_shows_only_the_users_traceback(apps: Path) -> None:
    code, lines = anyserve(apps, "start", "--app", "broken_app:app", "--port", "0")
    assert code == 1
    assert lines[0] == (
        "anyserve: app 'broken_app:app' raised while it was imported:"
        " FileNotFoundError: weights.bin is missing"
    )
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "FileNotFoundError: weights.bin is missing"
    frames = [line for line in lines if line.startswith('  File "')]
    assert len(frames) == 2 and all("broken_app.py" in f for f in frames), lines
    assert len(lines) == 1 + 1 + 2 * 2 + 1  # message, header, two frames, exception


def test_a_taken_port_is_one_line_for_every_server(apps: Path, taken_port: int) -> None:
    port = str(taken_port)
    for args, what in (
        (("start", "--app", "good_app:app", "--port", port), "gRPC"),
        (("api-server", "--port", port), "HTTP"),
        (("api-server", "--port", "0", "--grpc-port", port), "gRPC"),
        (("run", "good_app:app", "--port", "0", "--grpc-port", port), "gRPC"),
    ):
        code, lines = anyserve(apps, *args)
        assert code == 1, lines
        expected = f"anyserve: cannot listen for {what} on 127.0.0.1:{port}: Address already in use"
        assert lines[-1] == expected
        assert [line for line in lines if line.startswith("anyserve:")] == [expected]
        assert not any("Traceback" in line or "add_port" in line for line in lines), lines


def test_an_unusable_object_store_directory_is_one_line(apps: Path) -> None:
    blocker = apps / "not-a-dir"
    blocker.write_text("a file where the directory should be")
    store = str(blocker / "objects")
    code, lines = anyserve(
        apps, "start", "--app", "good_app:app", "--port", "0", "--object-store", store
    )
    assert code == 1
    assert lines == [
        "loading the model",
        f"anyserve: cannot use object store directory {store}: Not a directory",
    ]


def test_a_bad_flag_value_is_one_line(apps: Path) -> None:
    code, lines = anyserve(apps, "start", "--app", "good_app:app", "--port", "many")
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("anyserve: Invalid value for '--port'"), lines
    code, lines = anyserve(apps, "start", "--nope")
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("anyserve: No such option: --nope")
    assert lines[0].endswith("(see `anyserve start --help`)")


def test_a_world_writable_object_store_is_warned_about_at_start_up(apps: Path) -> None:
    store = apps / "objects"
    store.mkdir()
    store.chmod(0o777)
    proc = subprocess.Popen(
        [sys.executable, "-m", "anyserve.cli", "start", "--app", "good_app:app",
         "--port", "0", "--object-store", str(store)],
        cwd=apps, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:
            seen.append(line)
            if "serving" in line:
                break
        warnings = [line for line in seen if "writable by every user" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], seen
    finally:
        proc.terminate()
        proc.wait(timeout=20)
