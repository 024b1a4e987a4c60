"""A replica's registration with the API server: register, heartbeat, deregister.

The heartbeat *is* the registration: every interval the replica POSTs its full
``/register`` body again (the API server upserts it). An API server that
restarted therefore knows every live replica again within one interval, and a
replica whose workers changed is up to date after :meth:`Registration.notify`.
Failures are logged once per outage and retried forever.

Several API servers (``URL1,URL2``: they share a Redis registry) give
failover: the replica heartbeats with the first that answers and, when it
stops answering, with the next in turn (in the same heartbeat). The gRPC
entry it delegates to is the one the answering server named, so delegation
follows the failover too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import httpx

from anyserve.lane_slot import lane_on_this_host

logger = logging.getLogger(__name__)

# Shutdown must not wait long for an API server that is gone.
_UNREGISTER_TIMEOUT = 1.0


class Registration:
    """Keeps one replica registered with one API server (the first of
    ``api_server_url``'s comma-separated URLs that answers).

    ``body()`` returns the current registration JSON (``replica_id``,
    ``endpoint``, ``capabilities`` and optionally ``loadable``/``workers``); it is
    called for every POST. One httpx client per instance; close it with
    :meth:`aclose` (or use ``async with``). Use from one event loop.
    Raises ValueError when no URL is given or ``interval`` is not positive.
    """

    def __init__(
        self,
        api_server_url: str,
        body: Callable[[], dict[str, Any]],
        *,
        token: str | None = None,
        interval: float = 2.0,
        timeout: float = 5.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.urls = [u.strip().rstrip("/") for u in api_server_url.split(",") if u.strip()]
        if not self.urls:
            raise ValueError("no API server URL given")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._current = 0  # index into urls of the server heartbeated with
        self._body = body
        self._interval = interval
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout)
        # anyio events need a running loop: made on first use.
        self._wake: anyio.Event | None = None
        self._first: anyio.Event | None = None
        self._grpc_endpoint: str | None = None
        self._lane: tuple[str, str] | None = None
        self._outage = False
        self._registered = False

    @property
    def url(self) -> str:
        """The API server heartbeated with (or tried first next time)."""
        return self.urls[self._current]

    @property
    def grpc_endpoint(self) -> str | None:
        """The API server's gRPC entry (host:port) from its last answer, or None."""
        return self._grpc_endpoint

    @property
    def lane(self) -> tuple[str, str] | None:
        """The API server's local lane ``(path, name)`` from its last answer,
        when it is on this host (delegated calls go through it), else None."""
        return self._lane

    @property
    def interval(self) -> float:
        """Seconds between heartbeats (the API server's value once known)."""
        return self._interval

    @property
    def registered(self) -> bool:
        """True once a registration succeeded and the last attempt did not fail."""
        return self._registered and not self._outage

    def _first_event(self) -> anyio.Event:
        if self._first is None:
            self._first = anyio.Event()
        return self._first

    async def wait_registered(self) -> None:
        """Return once the first registration has succeeded."""
        await self._first_event().wait()

    def notify(self) -> None:
        """Send the current body now instead of at the next heartbeat.

        Cheap and coalescing: calls made before the POST starts are merged
        into it; a call made during a POST causes one more POST after it.
        """
        if self._wake is not None:
            self._wake.set()

    async def register_once(self) -> bool:
        """POST ``/register`` once, to the current API server and, when it does
        not answer, to the next ones in turn; True on success (failures are
        logged, not raised)."""
        body = self._body()
        failures: list[tuple[str, str]] = []  # (url, why)
        for step in range(len(self.urls)):
            index = (self._current + step) % len(self.urls)
            try:
                answer = await self._post(self.urls[index], body)
            except (httpx.HTTPError, _Refused, ValueError) as exc:
                failures.append((self.urls[index], str(exc) or type(exc).__name__))
                continue
            switched = index != self._current
            self._current = index
            self._registered_with(body, answer, switched)
            return True
        if not self._outage:
            self._outage = True
            logger.warning(
                "replica %s: registration with %s failed (%s); retrying every %.1fs",
                body.get("replica_id"),
                self.url if len(self.urls) == 1 else "every API server",
                "; ".join(why if len(failures) == 1 else f"{url}: {why}" for url, why in failures),
                self._interval,
            )
        return False

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        response = await self._http.post(f"{url}/register", json=body)
        if response.status_code != 200:
            raise _Refused(_error_text(response))
        return response.json()

    def _registered_with(self, body: dict[str, Any], answer: Any, switched: bool) -> None:
        self._learn(answer)
        if self._outage or not self._registered or switched:
            logger.info(
                "replica %s registered with %s (gRPC entry %s)",
                body.get("replica_id"),
                self.url,
                self._grpc_endpoint,
            )
        self._outage = False
        self._registered = True
        self._first_event().set()

    def _learn(self, answer: Any) -> None:
        if not isinstance(answer, dict):
            return
        endpoint = answer.get("grpc_endpoint")
        if isinstance(endpoint, str) and endpoint:
            self._grpc_endpoint = endpoint
        # Each answer says it afresh: another API server (a failover) has its own.
        self._lane = lane_on_this_host(answer.get("lane"))
        interval = answer.get("heartbeat_interval")
        if isinstance(interval, int | float) and interval > 0:
            self._interval = float(interval)

    async def run(self) -> None:
        """Register, then heartbeat every interval until cancelled."""
        while True:
            # A fresh event before each POST: notify() during the POST is kept.
            self._wake = anyio.Event()
            await self.register_once()
            with anyio.move_on_after(self._interval):
                await self._wake.wait()

    async def unregister(self) -> None:
        """Best-effort ``POST /unregister`` (one second at most; errors are logged)."""
        replica_id = self._body().get("replica_id")
        try:
            response = await self._http.post(
                f"{self.url}/unregister",
                json={"replica_id": replica_id},
                timeout=_UNREGISTER_TIMEOUT,
            )
            if response.status_code != 200:
                logger.warning("unregister refused: %s", _error_text(response))
        except httpx.HTTPError as exc:
            logger.debug("unregister from %s failed: %s", self.url, exc)
        self._registered = False

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._http.aclose()

    async def __aenter__(self) -> Registration:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Refused(Exception):
    """The API server answered the registration with an error status."""


def _error_text(response: httpx.Response) -> str:
    try:
        message = response.json().get("error", "")
    except (ValueError, AttributeError):
        message = response.text[:200]
    return f"HTTP {response.status_code}: {message}"
