"""``anyserve start`` hands its object-store flags to the replica's config."""

from __future__ import annotations

from typing import Any

import pytest
from typer.testing import CliRunner

import anyserve.cli.serving as serving
from anyserve.cli import app


def test_start_passes_the_object_flags_to_the_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []

    class Recorded:
        def __init__(self, config: Any) -> None:
            built.append(config)

        async def run(self) -> None:  # never started: launch is replaced
            raise AssertionError("not run")

    monkeypatch.setattr(serving, "launch", lambda plan: Recorded(plan.config))
    args = ["start", "--app", "examples.chat_app:app", "--object-ttl", "5"]
    result = CliRunner().invoke(app, [*args, "--object-sweep-interval", "0.5"])
    assert result.exit_code == 0, result.output
    (config,) = built
    assert config.object_ttl == 5.0 and config.object_sweep_interval == 0.5
    bad = CliRunner().invoke(app, [*args, "--object-sweep-interval", "0"])
    assert bad.exit_code != 0


def test_start_turns_the_fork_server_off_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    from anyserve.replica.spawning import FORK_SERVER_SUPPORTED

    built: list[Any] = []

    class Recorded:
        def __init__(self, config: Any) -> None:
            built.append(config)
            self.run = None  # never run: launch is replaced

    monkeypatch.setattr(serving, "launch", lambda plan: Recorded(plan.config))
    for flags in ([], ["--no-fork-server"], ["--fork-server"]):
        args = ["start", "--app", "examples.chat_app:app", *flags]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert [config.fork_server for config in built] == [FORK_SERVER_SUPPORTED, False, True]


def test_launch_run_by_hand_says_what_to_run_instead() -> None:
    import subprocess
    import sys

    for argv in ([], ["99"], ["not-a-descriptor"]):
        done = subprocess.run(
            [sys.executable, "-m", "anyserve.launch", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "start one of those instead" in done.stderr and "Traceback" not in done.stderr
