"""The anyserve exception tree, and the one place errors cross a process boundary.

Every error a request can meet is one of these classes. Each has a wire name
(``error_type``), one gRPC status code and one HTTP status::

    class                 error_type          HTTP  gRPC                meaning
    AnyServeError         internal            500   INTERNAL            unexpected failure
    ├── InvalidArgument   invalid_argument    400   INVALID_ARGUMENT    malformed input
    ├── NotFound          not_found           404   NOT_FOUND           nothing serves it
    │   └── LoopDetected  loop_detected       508   NOT_FOUND           hop limit, call cycle
    ├── PayloadTooLarge   payload_too_large   413   RESOURCE_EXHAUSTED  over a size limit
    ├── Overloaded        overloaded          429   RESOURCE_EXHAUSTED  queue full
    ├── Unavailable       unavailable         503   UNAVAILABLE         replica/worker lost
    ├── DeadlineExceeded  deadline_exceeded   504   DEADLINE_EXCEEDED   deadline passed
    ├── Unauthenticated   unauthenticated     401   UNAUTHENTICATED     missing/wrong token
    ├── PermissionDenied  permission_denied   403   PERMISSION_DENIED   not from where it is
    └── HandlerError      handler_error       500   INTERNAL            the handler raised

Handlers may raise these to choose the status the client sees; any other exception
from a handler becomes a ``HandlerError`` carrying its message.

An error keeps its class and message through every hop; this module converts it
to and from each form (docs/protocol.md, "Errors"): a gRPC status with an
``anyserve-error: <error_type>`` trailer (:func:`abort`, :func:`from_grpc`); an
HTTP answer or SSE error event ``{"error", "type", "code"}`` (:func:`to_http`,
:func:`from_http`, :func:`error_body`); a worker ``Error`` frame (:func:`to_frame`,
:func:`from_frame`); an in-band stream error (:func:`to_stream_error`,
:func:`from_stream_response`). A peer that is not anyserve is classified by its
status code alone; ``retry-after`` travels with each form when known.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

from anyserve._proto import worker_pb2 as wpb
from anyserve.proto import InferParameter, ModelInferResponse, ModelStreamInferResponse
from anyserve.rpc import LazyStatusCode

#: gRPC trailing-metadata key carrying an error's ``error_type``.
TRAILER = "anyserve-error"
#: Key (trailing metadata, HTTP header) carrying an error's retry delay in seconds.
RETRY_AFTER = "retry-after"
#: Response parameter of an in-band stream error naming its ``error_type``.
STREAM_PARAM = "anyserve_error"
#: Response parameter of an in-band error carrying its retry delay.
STREAM_RETRY_PARAM = "anyserve_retry_after"

if TYPE_CHECKING:
    import grpc


class AnyServeError(Exception):
    """Base class. ``message`` is what the client sees."""

    error_type: ClassVar[str] = "internal"
    grpc_code = LazyStatusCode("INTERNAL")
    http_status: ClassVar[int] = 500
    #: Seconds after which a retry may succeed (Overloaded, Unavailable); None: not said.
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AnyServeError):
    """The request (body, tensor, header or object reference) is malformed."""

    error_type = "invalid_argument"
    grpc_code = LazyStatusCode("INVALID_ARGUMENT")
    http_status = 400


class NotFound(AnyServeError):
    """No replica, handler or object answers to what was asked for."""

    error_type = "not_found"
    grpc_code = LazyStatusCode("NOT_FOUND")
    http_status = 404


class LoopDetected(NotFound):
    """A request went round too many hops (delegation) or calls (context.call).

    Its message starts with ``loop detected:`` so that a client reading only
    the gRPC status (a plain NOT_FOUND) still sees what happened.
    """

    error_type = "loop_detected"
    http_status = 508

    def __init__(self, message: str) -> None:
        if not message.startswith("loop detected: "):
            message = "loop detected: " + message
        super().__init__(message)


class PayloadTooLarge(AnyServeError):
    """A body, frame or object is over the configured limit.

    Its message starts with ``payload too large:`` so that a client reading
    only the gRPC status (RESOURCE_EXHAUSTED) can tell it from Overloaded.
    """

    error_type = "payload_too_large"
    grpc_code = LazyStatusCode("RESOURCE_EXHAUSTED")
    http_status = 413

    def __init__(self, message: str) -> None:
        if not message.startswith("payload too large: "):
            message = "payload too large: " + message
        super().__init__(message)


class Overloaded(AnyServeError):
    """Too many requests in flight; retry after ``retry_after`` seconds."""

    error_type = "overloaded"
    grpc_code = LazyStatusCode("RESOURCE_EXHAUSTED")
    http_status = 429

    retry_after: float

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(AnyServeError):
    """A replica or worker is unreachable, was lost, or is down (``retry_after``: how long)."""

    error_type = "unavailable"
    grpc_code = LazyStatusCode("UNAVAILABLE")
    http_status = 503

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(AnyServeError):
    """The request's deadline passed before it was answered."""

    error_type = "deadline_exceeded"
    grpc_code = LazyStatusCode("DEADLINE_EXCEEDED")
    http_status = 504


class Unauthenticated(AnyServeError):
    """A token is required and was missing or wrong."""

    error_type = "unauthenticated"
    grpc_code = LazyStatusCode("UNAUTHENTICATED")
    http_status = 401


class PermissionDenied(AnyServeError):
    """The caller may not do this from where it is (shared memory from another host)."""

    error_type = "permission_denied"
    grpc_code = LazyStatusCode("PERMISSION_DENIED")
    http_status = 403


class HandlerError(AnyServeError):
    """The user's handler raised; the message is the exception's."""

    error_type = "handler_error"


class StartupError(Exception):
    """A server could not start (app not importable, port taken, unusable
    directory). Not a request error: ``message`` is one line for the
    operator; ``detail`` (may be empty) is the user's own traceback."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


#: Every request error class, by its wire name.
ERROR_TYPES: dict[str, type[AnyServeError]] = {
    cls.error_type: cls
    for cls in (
        AnyServeError,
        InvalidArgument,
        NotFound,
        LoopDetected,
        PayloadTooLarge,
        Overloaded,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        HandlerError,
    )
}

# Peers that are not anyserve: the class a bare status (by name) stands for.
_BY_GRPC_CODE: dict[str, type[AnyServeError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "UNAVAILABLE": Unavailable,
    # A call cancelled under us (the peer went away) is a lost peer to our caller.
    "CANCELLED": Unavailable,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
}
_BY_HTTP_STATUS: dict[int, type[AnyServeError]] = {
    cls.http_status: cls for cls in ERROR_TYPES.values() if cls is not HandlerError
}


def _build(cls: type[AnyServeError], message: str, retry_after: float | None) -> AnyServeError:
    if cls is Overloaded:
        return Overloaded(message, 1.0 if retry_after is None else retry_after)
    return Unavailable(message, retry_after) if cls is Unavailable else cls(message)


def _seconds(value: object) -> float | None:
    try:
        seconds = float(str(value))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# --------------------------------------------------------------------------- gRPC


def grpc_trailers(exc: AnyServeError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that carries ``exc``'s class across a gRPC hop."""
    if exc.retry_after is not None:
        return ((TRAILER, exc.error_type), (RETRY_AFTER, f"{exc.retry_after:g}"))
    return ((TRAILER, exc.error_type),)


async def abort(context: Any, exc: AnyServeError) -> NoReturn:
    """End a grpc.aio call with ``exc`` (status, message and class trailer).

    ``context`` is a ``grpc.aio.ServicerContext``; its ``abort`` raises.
    """
    await context.abort(exc.grpc_code, exc.message, grpc_trailers(exc))
    raise AssertionError("ServicerContext.abort() returned")  # pragma: no cover


def from_grpc(
    code: grpc.StatusCode, message: str, trailers: Iterable[tuple[str, Any]] | None = None
) -> AnyServeError:
    """Rebuild the error a gRPC peer ended a call with.

    The ``anyserve-error`` trailer names the class; without one (a peer that is
    not anyserve, or gRPC's own failure) the status code decides, and gRPC's
    own "message larger than max" is a PayloadTooLarge.
    """
    error_type, retry_after = None, None
    for key, value in trailers or ():
        if key == TRAILER:
            error_type = str(value)
        elif key == RETRY_AFTER:
            retry_after = _seconds(value)
    cls = ERROR_TYPES.get(error_type or "")
    if cls is None:
        if code.name == "RESOURCE_EXHAUSTED" and "larger than" in message:
            cls = PayloadTooLarge
        else:
            cls = _BY_GRPC_CODE.get(code.name, AnyServeError)
    return _build(cls, message or code.name, retry_after)


def from_rpc_error(exc: grpc.RpcError) -> AnyServeError:
    """The anyserve error for a failed grpc.aio call (``AioRpcError``)."""
    return from_grpc(exc.code(), exc.details() or "", exc.trailing_metadata())


_Self = TypeVar("_Self")
_Result = TypeVar("_Result")


def grpc_method(
    method: Callable[[_Self, Any, Any], Awaitable[_Result]],
) -> Callable[[_Self, Any, Any], Awaitable[_Result]]:
    """Decorate a unary grpc.aio servicer method ``(self, request, context)``:
    an AnyServeError it raises ends the call through :func:`abort`."""

    @functools.wraps(method)
    async def wrapper(self: _Self, request: Any, context: Any) -> _Result:
        try:
            return await method(self, request, context)
        except AnyServeError as exc:
            await abort(context, exc)

    return wrapper


# --------------------------------------------------------------------------- HTTP


def error_body(exc: AnyServeError) -> dict[str, Any]:
    """``{"error": message, "type": error_type, "code": gRPC status name}``, plus
    ``retry_after`` when the error has one: the JSON of an HTTP error and of an SSE
    ``event: error``."""
    body: dict[str, Any] = {"error": exc.message, "type": exc.error_type}
    body["code"] = exc.grpc_code.name
    if exc.retry_after is not None:
        body["retry_after"] = exc.retry_after
    return body


def to_http(exc: AnyServeError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """``(status, JSON body, headers)`` of the HTTP answer for ``exc``."""
    retry = exc.retry_after
    # Whole seconds, at least 1: what HTTP's Retry-After allows.
    headers = {} if retry is None else {"Retry-After": str(max(1, math.ceil(retry)))}
    return exc.http_status, error_body(exc), headers


def from_error_body(doc: object, status: int | None = None) -> AnyServeError:
    """Rebuild an error from a body made by :func:`error_body` (an HTTP error's
    JSON or an SSE error event's data). A body without ``type`` is classified
    by its gRPC ``code``, else by ``status``."""
    if not isinstance(doc, Mapping):
        doc = {"error": str(doc)}
    message = str(doc.get("error") or "")
    cls = ERROR_TYPES.get(str(doc.get("type") or ""))
    if cls is None:
        cls = _BY_GRPC_CODE.get(str(doc.get("code")))
    if cls is None:
        cls = _BY_HTTP_STATUS.get(status or 500, AnyServeError)
    return _build(cls, message or f"HTTP {status}", _seconds(doc.get("retry_after", "")))


def from_http(status: int, body: bytes | str, retry_after: str | None = None) -> AnyServeError:
    """Rebuild the error of an HTTP error answer (status, body, Retry-After)."""
    try:
        doc: object = json.loads(body)
    except ValueError:
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        doc = {"error": text[:500]}
    if not isinstance(doc, Mapping):
        doc = {"error": str(doc)}
    if retry_after is not None and "retry_after" not in doc:
        doc = {**doc, "retry_after": retry_after}
    return from_error_body(doc, status)


# --------------------------------------------------------------------------- worker frames


def to_frame(exc: AnyServeError) -> wpb.Error:
    """The worker ``Error`` frame body for ``exc``."""
    return wpb.Error(code=exc.error_type, message=exc.message, retry_after=exc.retry_after or 0.0)


def from_frame(frame: wpb.Error) -> AnyServeError:
    """Rebuild the error a worker reported in an ``Error`` frame."""
    cls = ERROR_TYPES.get(frame.code, AnyServeError)
    return _build(cls, frame.message, frame.retry_after or None)


# --------------------------------------------------------------------------- streams


def to_stream_error(exc: AnyServeError, request_id: str = "", model_name: str = "") -> bytes:
    """A serialized ``ModelStreamInferResponse`` reporting ``exc`` in-band for
    one request of a stream (Triton's convention: ``error_message`` set)."""
    response = ModelInferResponse(id=request_id, model_name=model_name)
    response.parameters[STREAM_PARAM].CopyFrom(InferParameter(string_param=exc.error_type))
    if exc.retry_after is not None:
        response.parameters[STREAM_RETRY_PARAM].CopyFrom(
            InferParameter(double_param=exc.retry_after)
        )
    message = ModelStreamInferResponse(error_message=exc.message, infer_response=response)
    return message.SerializeToString()


def from_stream_response(message: ModelStreamInferResponse) -> AnyServeError | None:
    """The error a stream response reports in-band, or None when it is a result.

    A response from a peer that is not anyserve (no ``anyserve_error``
    parameter) is a HandlerError, what Triton means by it.
    """
    if not message.error_message:
        return None
    params = message.infer_response.parameters
    # Membership first: indexing a message map inserts the key.
    error_type = params[STREAM_PARAM].string_param if STREAM_PARAM in params else ""
    retry_after = params[STREAM_RETRY_PARAM].double_param if STREAM_RETRY_PARAM in params else None
    cls = ERROR_TYPES.get(error_type, HandlerError)
    return _build(cls, message.error_message, retry_after)
