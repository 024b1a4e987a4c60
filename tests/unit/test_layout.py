"""The layout rules docs/architecture.md states, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "anyserve"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "_proto" not in p.parts)


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_modules_stay_small() -> None:
    big = {
        str(p.relative_to(PACKAGE)): n
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not big, f"split these by what they hold: {big}"


def test_the_api_server_and_the_replica_never_import_each_other() -> None:
    for side, other in (("api_server", "anyserve.replica"), ("replica", "anyserve.api_server")):
        for path in (PACKAGE / side).rglob("*.py"):
            crossing = {m for m in imports(path) if m == other or m.startswith(other + ".")}
            assert not crossing, f"{path.relative_to(PACKAGE)} imports {crossing}"


def test_handler_side_modules_do_not_pull_in_the_servers() -> None:
    # What a worker process imports to run user code must not drag the API
    # server (Starlette, uvicorn) along.
    handler_side = ("app.py", "handlers.py", "handler_options.py", "context.py", "errors.py")
    for name in (*handler_side, "capability.py", "wire.py", "rpc.py", "signature.py"):
        servers = {m for m in imports(PACKAGE / name) if m.startswith("anyserve.api_server")}
        assert not servers, f"{name} imports {servers}"
