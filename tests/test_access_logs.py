"""Access logs and ``--log-format json``, from a real ``anyserve run`` process.

One line per request at the API server and one per call at the replica, both
carrying the request id the client sent (echoed in ``X-Request-Id``); with
``--log-format json`` every line is a JSON object, the workers' included, and
those carry the worker id. ``anyserve run`` prints each replica's metrics port.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.api_calls import text_body
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Lines:
    """Lines of a pipe, collected by a thread (the test polls them)."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, found: Any, timeout: float = 30.0) -> Any:
        """Wait until ``found(lines)`` is truthy; return it. TimeoutError otherwise."""
        with self._changed:
            result = self._changed.wait_for(lambda: found(list(self.lines)), timeout)
        if not result:
            raise TimeoutError(f"not seen within {timeout}s; lines: {self.lines[-30:]}")
        return result


@pytest.fixture(scope="module")
def running() -> Iterator[tuple[str, _Lines, _Lines]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "anyserve.cli", "run", "tests.apps.metrics_app:app",
         "--port", str(port), "--grpc-port", "0", "--log-format", "json", "--grace", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Tracing on (spans printed to stdout), so that access lines carry trace ids.
        env={**os.environ, "OTEL_TRACES_EXPORTER": "console"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = _Lines(proc.stdout), _Lines(proc.stderr)
        out.wait_for(lambda lines: any("anyserve is running" in line for line in lines))
        yield f"http://127.0.0.1:{port}", out, err
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _json_lines(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.strip()]


def test_access_lines_carry_the_request_id(running: tuple[str, _Lines, _Lines]) -> None:
    url, _, err = running
    with httpx.Client(base_url=url, timeout=20) as http:
        response = http.post(
            "/infer",
            headers={
                "X-Capability-Model": "alpha",
                "X-Request-Id": "req-abc-1",
                "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
            },
            json=text_body("text_input", "hello"),
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-abc-1"

    def both(lines: list[str]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        mine = [d for d in _json_lines(lines) if d.get("request_id") == "req-abc-1"]
        api = [d for d in mine if d.get("path") == "/infer"]
        replica = [d for d in mine if d.get("method") == "ModelInfer"]
        return (api[0], replica[0]) if api and replica else None

    api, replica = err.wait_for(both)
    assert api["logger"] == "anyserve.access"
    assert api["status"] == 200 and api["method"] == "POST"
    assert api["capability"] == "model=alpha,type=echo"
    assert api["replica"] and api["duration_ms"] > 0
    # The client's trace, continued by the API server and the replica.
    assert api["trace_id"] == replica["trace_id"] == TRACE_ID
    assert replica["outcome"] == "ok" and replica["query"] == "model=alpha"


def test_every_line_is_json_and_worker_lines_name_the_worker(
    running: tuple[str, _Lines, _Lines],
) -> None:
    url, _, err = running
    with httpx.Client(base_url=url, timeout=20) as http:
        response = http.post(
            "/v2/models/beta/infer",
            headers={"X-Request-Id": "req-fail-2"},
            json=text_body("text_input", "fail"),
        )
    assert response.status_code == 500

    def all_three(lines: list[str]) -> list[dict[str, Any]] | None:
        # The worker's warning, the replica's access line and the API server's:
        # written by three processes, so they arrive in any order.
        docs = _json_lines(lines)
        worker = [
            d for d in docs if d.get("logger") == "anyserve.worker" and "req-fail-2" in d["message"]
        ]
        mine = [d for d in docs if d.get("request_id") == "req-fail-2"]
        if worker and any("status" in d for d in mine) and any("outcome" in d for d in mine):
            return worker + mine
        return None

    docs = err.wait_for(all_three)
    doc = docs[0]
    assert doc["worker"] == "beta-0" and doc["level"] == "warning"
    failed = [d for d in docs[1:] if d.get("request_id") == "req-fail-2"]
    assert {d.get("status") for d in failed if "status" in d} == {500}
    assert {d.get("outcome") for d in failed if "outcome" in d} == {"handler_error"}


def test_run_prints_each_replicas_metrics_port(running: tuple[str, _Lines, _Lines]) -> None:
    _, out, _ = running
    line = next(line for line in out.lines if line.startswith("replica "))
    match = re.search(r"metrics :(\d+)", line)
    assert match, line
    response = httpx.get(f"http://127.0.0.1:{match.group(1)}/metrics", timeout=10)
    assert response.status_code == 200
    assert "anyserve_replica_workers" in response.text
