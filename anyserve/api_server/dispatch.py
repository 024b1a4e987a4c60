"""The HTTP entry's ASGI application: the unary inference routes answered
directly, every other request through the Starlette application.

Starlette's stack costs a request a chain of layers before and after its
endpoint: the error middleware, the metrics middleware, the exception
middleware, the router's regular-expression scan of its 44 routes
(``/infer`` is the ninth), the route's own exception wrapper, and one
``send`` wrapper per layer: 12 of the 72 us the HTTP side of a small
``POST /infer`` cost in process (router stubbed).
:class:`Dispatch` serves the hot routes with the same behaviour in one
layer: the same endpoint, the same ``Route`` in the scope (tracing names its
span after it), the same error answers (:func:`on_error`, :func:`on_http`),
the same measurement and access-log line (:class:`~anyserve.metrics.http.Measured`),
and after a crash the same 500 answer and the exception raised on to uvicorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from anyserve.api_server.responses import error_response, json_response
from anyserve.errors import AnyServeError
from anyserve.metrics.api import ApiMetrics
from anyserve.metrics.http import Measured, endpoint_of

Handler = Callable[[Request], Awaitable[Response]]


async def on_error(request: Request, exc: Exception) -> Response:
    """The answer to an anyserve error: its status and ``{"error": ...}``."""
    assert isinstance(exc, AnyServeError)
    return error_response(exc, getattr(request.state, "request_id", ""))


async def on_http(request: Request, exc: Exception) -> Response:
    """The answer to Starlette's HTTPException (unknown route, wrong method)."""
    assert isinstance(exc, HTTPException)
    return json_response({"error": exc.detail}, exc.status_code, exc.headers)


async def on_crash(request: Request, exc: Exception) -> Response:
    """The 500 answer to any other exception (raised on to the server after it,
    which logs it)."""
    return error_response(AnyServeError(f"internal error: {type(exc).__name__}: {exc}"))


class _Template:
    """A hot route's path, matched segment by segment: a ``{param}`` segment
    takes any non-empty segment, as Starlette's default (str) convertor does."""

    __slots__ = ("params", "parts", "route")

    def __init__(self, route: Route) -> None:
        self.route = route
        self.parts = route.path.split("/")
        self.params = {i: part[1:-1] for i, part in enumerate(self.parts) if part.startswith("{")}
        if any(":" in name for name in self.params.values()):
            raise ValueError(f"hot route {route.path!r}: only plain {{name}} parameters")

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.parts):
            return None
        found: dict[str, str] = {}
        params = self.params
        for i, (want, got) in enumerate(zip(self.parts, parts, strict=True)):
            name = params.get(i)
            if name is None:
                if want != got:
                    return None
            elif not got:
                return None
            else:
                found[name] = got
        return found


class Dispatch:
    """The ASGI application of one server's HTTP entry (see the module).

    ``hot`` are routes of ``app`` (POST only, inference endpoints the metrics
    count) served directly; they must be the routes ``app``'s router would pick
    for their paths (``tests/unit/test_dispatch.py`` checks it). Requests
    under a ``root_path`` go through ``app``, whose router strips it.
    """

    def __init__(self, app: Starlette, hot: Sequence[Route], metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.hot = tuple(hot)
        self._exact: dict[str, Route] = {}
        self._templates: list[_Template] = []
        # The metrics' endpoint kind of each route, by its path template:
        # what endpoint_of says of any path the route matches, as it says of
        # the template.
        self._kinds: dict[str, str] = {}
        for route in hot:
            kind = endpoint_of("POST", route.path)
            if route.methods != {"POST"} or kind is None:
                raise ValueError(f"hot route {route.path!r} must be a POST inference route")
            self._kinds[route.path] = kind
            if route.param_convertors:
                self._templates.append(_Template(route))
            else:
                self._exact[route.path] = route

    def match(self, scope: Scope) -> tuple[Route, dict[str, str]] | None:
        """The hot route serving ``scope`` and its path parameters, or None."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        route = self._exact.get(path)
        if route is not None:
            return route, {}
        if self._templates:
            parts = path.split("/")
            for template in self._templates:
                params = template.match(parts)
                if params is not None:
                    return template.route, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope)
        if found is None:
            await self.app(scope, receive, send)
            return
        route, params = found
        # What Starlette's application, router and route leave in the scope.
        scope["app"] = self.app
        scope["router"] = self.app.router
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = params
        measured = Measured(self.metrics, self._kinds[route.path], scope, receive, send)
        self.metrics.in_flight += 1
        try:
            await self._answer(route.endpoint, scope, measured)
        except Exception as exc:
            measured.record(exc)
            # Starlette's error middleware (outside the metrics): the 500
            # answer unless one had started, then the exception goes on.
            if not measured.status:
                response = await on_crash(Request(scope), exc)
                await response(scope, receive, send)
            raise
        except BaseException as exc:  # cancellation: the client went away
            measured.record(exc)
            raise
        measured.record()

    async def _answer(self, endpoint: Handler, scope: Scope, measured: Measured) -> None:
        """Starlette's route and exception handling around ``endpoint``."""
        request = Request(scope, measured.receive)
        try:
            response = await endpoint(request)
            await response(scope, measured.receive, measured.send)
        except (AnyServeError, HTTPException) as exc:
            if measured.status:
                raise RuntimeError(
                    "Caught handled exception, but response already started."
                ) from exc
            handler = on_error if isinstance(exc, AnyServeError) else on_http
            answer = await handler(request, exc)
            await answer(scope, measured.receive, measured.send)
            # As Starlette does: a reused exception would pile up tracebacks.
            exc.__traceback__ = None
