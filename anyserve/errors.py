"""The anyserve exception tree.

Every error a request can meet is one of these classes, and each class maps to
exactly one gRPC status code and one HTTP status (DESIGN.md section 10)::

    AnyServeError                 500  INTERNAL
    ├── InvalidArgument           400  INVALID_ARGUMENT   malformed body, bad tensor, bad reference
    ├── NotFound                  404  NOT_FOUND          no replica/handler/object
    │   └── LoopDetected          508  NOT_FOUND          delegation hop limit or call cycle
    ├── PayloadTooLarge           413  RESOURCE_EXHAUSTED body or frame over the limit
    ├── Overloaded                429  RESOURCE_EXHAUSTED queue full (carries retry_after)
    ├── Unavailable               503  UNAVAILABLE        replica or worker unreachable or died
    ├── DeadlineExceeded          504  DEADLINE_EXCEEDED
    ├── Unauthenticated           401  UNAUTHENTICATED    missing or wrong token
    └── HandlerError              500  INTERNAL           the user's handler raised

Handlers may raise these themselves to choose the status the client sees; any
other exception from a handler becomes a ``HandlerError`` carrying its message.
"""

from __future__ import annotations

import grpc

# Prefixes that survive a gRPC hop where two classes share one status code:
# a NOT_FOUND that is a loop (HTTP 508), a RESOURCE_EXHAUSTED that is a payload
# over a limit (HTTP 413, not 429).
LOOP_PREFIX = "loop detected: "
TOO_LARGE_PREFIX = "payload too large: "


class AnyServeError(Exception):
    """Base class. ``message`` is what the client sees."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AnyServeError):
    """The request (body, tensor, header or object reference) is malformed."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 400


class NotFound(AnyServeError):
    """No replica, handler or object answers to what was asked for."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class LoopDetected(NotFound):
    """A request went round too many hops (delegation) or calls (context.call).

    The message always starts with ``LOOP_PREFIX`` so that the loop survives a
    trip through gRPC, where it travels as a plain NOT_FOUND.
    """

    http_status = 508

    def __init__(self, message: str) -> None:
        if not message.startswith(LOOP_PREFIX):
            message = LOOP_PREFIX + message
        super().__init__(message)


class PayloadTooLarge(AnyServeError):
    """A body, frame or object is over the configured limit.

    The message always starts with ``TOO_LARGE_PREFIX`` so that a 413 stays a
    413 (and not a 429) after a trip through gRPC.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413

    def __init__(self, message: str) -> None:
        if not message.startswith(TOO_LARGE_PREFIX):
            message = TOO_LARGE_PREFIX + message
        super().__init__(message)


class Overloaded(AnyServeError):
    """Too many requests in flight; retry after ``retry_after`` seconds."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(AnyServeError):
    """A replica or worker could not be reached, or died while serving."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class DeadlineExceeded(AnyServeError):
    """The request's deadline passed before it was answered."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504


class Unauthenticated(AnyServeError):
    """A token is required and was missing or wrong."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class HandlerError(AnyServeError):
    """The user's handler raised; the message is the exception's."""


_BY_CODE: dict[grpc.StatusCode, type[AnyServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: HandlerError,
}


def from_grpc(code: grpc.StatusCode, message: str) -> AnyServeError:
    """Rebuild the anyserve error for a gRPC status received from another hop."""
    if code == grpc.StatusCode.NOT_FOUND and message.startswith(LOOP_PREFIX):
        return LoopDetected(message)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith(TOO_LARGE_PREFIX):
        return PayloadTooLarge(message)
    if code == grpc.StatusCode.CANCELLED:
        return Unavailable(message or "call cancelled")
    cls = _BY_CODE.get(code, AnyServeError)
    return cls(message)


def from_code_name(name: str, message: str) -> AnyServeError:
    """Rebuild an error from a status code name such as ``"NOT_FOUND"``."""
    try:
        code = grpc.StatusCode[name]
    except KeyError:
        code = grpc.StatusCode.INTERNAL
    return from_grpc(code, message)
