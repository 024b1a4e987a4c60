"""How a worker's exit is told to operators."""

from __future__ import annotations

from anyserve.replica.spawning import exit_text


def test_code_3_blames_the_app_import_only_before_hello() -> None:
    assert "could not import the app" in exit_text(3, started=False)
    # A handler that calls sys.exit(3) after start-up did not fail to import.
    assert exit_text(3, started=True) == "exited with code 3"
    assert exit_text(1, started=False) == "exited with code 1"


def test_signals_are_named() -> None:
    assert exit_text(-9) == "was killed by SIGKILL (exit code -9)"
    assert exit_text(-200) == "was killed by signal 200 (exit code -200)"
    assert exit_text(None) == "exited"
