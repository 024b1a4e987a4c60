"""The hot inference routes served without Starlette's stack behave as through it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Message

from anyserve.api_server.app import build_app
from anyserve.api_server.config import ApiServerConfig
from anyserve.api_server.dispatch import Dispatch
from anyserve.api_server.meta import RequestMeta
from anyserve.api_server.state import ApiState
from anyserve.errors import NotFound
from anyserve.metrics.http import endpoint_of

pytestmark = pytest.mark.anyio

PATHS = [
    "/infer",
    "/infer/",
    "/infer/stream",
    "/v2/models/m/infer",
    "/v2/models/stats/infer",
    "/v2/models//infer",
    "/v2/models/a b/infer",
    "/v2/models/m/versions/3/infer",
    "/v2/models/m/versions//infer",
    "/v2/models/m/versions/3/4/infer",
    "/v2/models/m/generate",
    "/v2/models/m/x/infer",
    "/v1/chat/completions",
    "/register",
]


def _scope(path: str, method: str = "POST", **extra: Any) -> dict[str, Any]:
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": []}
    return {**scope, "state": {}, **extra}


def _starlette_route(app: Dispatch, scope: dict[str, Any]) -> object:
    for route in app.app.router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
    return None


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_a_hot_path_is_the_route_starlette_would_pick(path: str, method: str) -> None:
    app = build_app(ApiState(ApiServerConfig()))
    scope = _scope(path, method)
    found = app.match(scope)
    expected = _starlette_route(app, scope)
    if expected not in app.hot:
        assert found is None
        return
    assert found is not None
    route, params = found
    assert route is expected
    assert params == route.matches(scope)[1]["path_params"]
    assert endpoint_of(method, path) == "infer"  # what Dispatch counts it as


def test_a_request_under_a_root_path_goes_through_starlette() -> None:
    app = build_app(ApiState(ApiServerConfig()))
    assert app.match(_scope("/infer", root_path="/api")) is None


class _Client:
    """One request driven through the ASGI app, its messages kept."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def body(self) -> Any:
        return json.loads(self.sent[1]["body"])


def _served(raising: BaseException | None) -> tuple[Dispatch, ApiState]:
    """An app whose hot ``/infer`` route raises ``raising`` (answers 200 when None)."""
    state = ApiState(ApiServerConfig())
    app = build_app(state)

    async def endpoint(request: Request) -> Response:
        request.state.request_id = "rid"
        request.state.meta = RequestMeta(query={}, model_name="", request_id="rid", timeout=1)
        if raising is not None:
            raise raising
        return Response(b"{}", media_type="application/json")

    route = app.match(_scope("/infer"))
    assert route is not None
    route[0].endpoint = endpoint
    return app, state


def _count(state: ApiState, code: int) -> int:
    return state.metrics.children(None, "infer").codes.get(code, 0)


async def test_an_anyserve_error_is_answered_with_its_status_and_counted() -> None:
    app, state = _served(NotFound("no such thing"))
    client = _Client()
    await app(_scope("/infer"), client.receive, client.send)
    assert client.status == 404
    assert client.body["error"] == "no such thing"
    assert (b"x-request-id", b"rid") in client.sent[0]["headers"]
    assert _count(state, 404) == 1
    assert state.metrics.in_flight == 0


async def test_a_crash_is_answered_500_counted_and_raised_on() -> None:
    app, state = _served(ZeroDivisionError("boom"))
    client = _Client()
    with pytest.raises(ZeroDivisionError):
        await app(_scope("/infer"), client.receive, client.send)
    assert client.status == 500
    assert client.body["error"] == "internal error: ZeroDivisionError: boom"
    assert _count(state, 500) == 1
    assert state.metrics.in_flight == 0


async def test_an_answer_is_measured() -> None:
    app, state = _served(None)
    client = _Client()
    await app(_scope("/infer"), client.receive, client.send)
    assert client.status == 200
    children = state.metrics.children(None, "infer")
    assert (children.codes, children.resp_bytes) == ({200: 1}, 2)
