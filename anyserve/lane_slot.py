"""Which local lane to use: :class:`LaneSlot` keeps the lane to one server
(opened on first use, gRPC for a while after a failed attempt), and
:func:`lane_on_this_host` reads an API server's description of its lane."""

from __future__ import annotations

import asyncio
import logging

from anyserve import shm
from anyserve.lane_client import Lane

log = logging.getLogger("anyserve.lane")


def lane_on_this_host(said: object) -> tuple[str, str] | None:
    """``(path, name)`` of the lane an API server described (``{"path",
    "name", "host"}`` in its ``/health`` and ``/register`` answers) when it
    is on this host, else None."""
    if not isinstance(said, dict):
        return None
    path, name, host = said.get("path"), said.get("name"), said.get("host")
    if not (isinstance(path, str) and isinstance(name, str) and host):
        return None
    return (path, name) if host == shm.host_id() else None


#: Seconds a server's calls go over gRPC after its lane could not be opened.
RETRY = 5.0


class LaneSlot:
    """The lane to one server, opened on first use and again once lost or
    moved; after an attempt that failed, none for :data:`RETRY` seconds
    (calls then go over gRPC)."""

    def __init__(self) -> None:
        self._lane: Lane | None = None
        self._key: tuple[str, str] | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0

    @property
    def lane(self) -> Lane | None:
        """The lane while it is open."""
        lane = self._lane
        return lane if lane is not None and lane.usable else None

    async def get(self, path: str, name: str, within: float, what: str = "") -> Lane | None:
        """The open lane to the server named ``name`` at ``path``, opening it
        (within ``within`` seconds) when needed; None when it cannot be."""
        lane = self.current(path, name)
        if lane is not None or asyncio.get_running_loop().time() < self._retry_at:
            return lane
        async with self._lock:  # one attempt at a time, not one per call
            lane = self.current(path, name)
            if lane is not None:
                return lane
            self.close()
            try:
                lane = await Lane.open(path, name, within, what)
            except (OSError, TimeoutError, ValueError) as exc:
                log.warning(
                    "%s: local lane %s not usable (%s); calling it over gRPC",
                    what or f"replica {name}",
                    path,
                    exc,
                )
                self._retry_at = asyncio.get_running_loop().time() + RETRY
                return None
            self._lane, self._key = lane, (path, name)
            return lane

    def current(self, path: str, name: str) -> Lane | None:
        """The lane while it is open to the server named ``name`` at ``path``
        (None also when it was opened to another), without waiting."""
        lane = self.lane
        return lane if lane is not None and self._key == (path, name) else None

    def close(self) -> None:
        if self._lane is not None:
            self._lane.close()
            self._lane = None
