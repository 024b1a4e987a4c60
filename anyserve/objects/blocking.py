"""The facades handlers use: ``BlockingObjects`` and the per-request module functions.

Handlers use the module-level ``create``/``get``/``delete``/``exists`` (re-exported as
``anyserve.objects.create`` etc.), which delegate to the facade bound (``bind``) for the
current request: awaitable in async handlers, blocking (``BlockingObjects``) in sync
handlers that run in anyio worker threads.
"""

from __future__ import annotations

import contextvars
from typing import Any, Protocol

import anyio
import anyio.from_thread

from anyserve.objects.ref import ObjRef, RefLike

__all__ = [
    "AsyncObjects",
    "BlockingObjects",
    "bind",
    "create",
    "delete",
    "exists",
    "get",
    "reset",
]


class AsyncObjects(Protocol):
    """What an async handler's objects facade offers (``ObjectStore`` is one)."""

    async def create(self, data: Any) -> ObjRef: ...
    async def get(self, ref: RefLike) -> Any: ...
    async def delete(self, ref: RefLike) -> bool: ...
    async def exists(self, ref: RefLike) -> bool: ...


class BlockingObjects:
    """The same four operations, blocking, for sync handlers.

    Each call runs the async operation on the event loop with ``anyio.from_thread.run``,
    so it must be made from a worker thread started by ``anyio.to_thread.run_sync`` (as
    sync handlers are); from the event loop thread itself anyio raises ``RuntimeError``.
    Errors are the async operation's.
    """

    def __init__(self, store: AsyncObjects) -> None:
        self.store = store

    def create(self, data: Any) -> ObjRef:
        """Blocking ``ObjectStore.create``."""
        return anyio.from_thread.run(self.store.create, data)

    def get(self, ref: RefLike) -> Any:
        """Blocking ``ObjectStore.get``."""
        return anyio.from_thread.run(self.store.get, ref)

    def delete(self, ref: RefLike) -> bool:
        """Blocking ``ObjectStore.delete``."""
        return anyio.from_thread.run(self.store.delete, ref)

    def exists(self, ref: RefLike) -> bool:
        """Blocking ``ObjectStore.exists``."""
        return anyio.from_thread.run(self.store.exists, ref)


# --------------------------------------------------------------------------- per-request API

#: The objects facade of the handler running in this context (set by the worker).
_current: contextvars.ContextVar[AsyncObjects | BlockingObjects] = contextvars.ContextVar(
    "anyserve.objects._current"
)

_OUTSIDE = "anyserve.objects.* is only available inside a handler"


def bind(
    facade: AsyncObjects | BlockingObjects,
) -> contextvars.Token[AsyncObjects | BlockingObjects]:
    """Make ``facade`` the target of the module-level functions in this context.

    Bind an ``ObjectStore`` (or another async facade) for async handlers and a
    ``BlockingObjects`` for sync ones. ``anyio.to_thread.run_sync`` copies the context, so
    a binding made before starting a worker thread is seen inside it. Undo with ``reset``.
    """
    return _current.set(facade)


def reset(token: contextvars.Token[AsyncObjects | BlockingObjects]) -> None:
    """Undo the ``bind`` that returned ``token``."""
    _current.reset(token)


def _facade() -> AsyncObjects | BlockingObjects:
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(_OUTSIDE) from None


def create(data: Any) -> Any:
    """Store ``data`` via the bound facade: an ``ObjRef`` (sync) or a coroutine (async).

    Raises ``RuntimeError`` outside a handler.
    """
    return _facade().create(data)


def get(ref: RefLike) -> Any:
    """Read an object via the bound facade: the value (sync) or a coroutine (async)."""
    return _facade().get(ref)


def delete(ref: RefLike) -> Any:
    """Delete an object via the bound facade: a bool (sync) or a coroutine (async)."""
    return _facade().delete(ref)


def exists(ref: RefLike) -> Any:
    """Check an object via the bound facade: a bool (sync) or a coroutine (async)."""
    return _facade().exists(ref)
