"""Triton's system shared memory regions: the table one API server keeps.

A client creates a POSIX shared memory segment (``shm_open(key)``, a file in
``/dev/shm``), registers a *region* of it under a name (key, offset, byte
size), then names that region in its requests instead of sending tensor
bytes. Regions are local to one API server, as they are to one Triton server.

The table holds facts only: no file descriptor or mapping stays open (whoever
reads or writes a region opens :attr:`Region.path` for that request). A
registration is checked once, with Triton's wording where Triton has one:

* the name is new (else :class:`RegionExists`: 400 over HTTP, as Triton's HTTP
  server answers ``ALREADY_EXISTS``; ``ALREADY_EXISTS`` over gRPC);
* the key is a plain name in ``/dev/shm`` (leading slashes dropped, as
  ``shm_open`` does; no other ``/``, not ``.``/``..``, at most 254 bytes);
* the segment exists, is a regular file (a symbolic link is refused) that
  this process may read and write;
* ``offset`` and ``byte_size`` are non-negative integers, ``byte_size`` is not
  zero, and ``offset + byte_size`` is within the segment's size;
* the table holds fewer than ``max_regions`` regions.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import grpc

from anyserve.errors import InvalidArgument, NotFound, Overloaded

#: Where POSIX shared memory segments live (``shm_open``'s directory on Linux).
SHM_DIR = "/dev/shm"
#: How many regions one API server holds at most.
MAX_REGIONS = 4096
#: Longest region name accepted (characters).
MAX_NAME = 256
#: Triton's answer to a registration that names no region.
NEED_NAME = "'region name' is necessary to register system shared memory region"
# shm_open refuses names of NAME_MAX (255) bytes or more.
_MAX_KEY_BYTES = 254


class RegionExists(InvalidArgument):
    """A region name already registered. It travels as InvalidArgument (HTTP
    400, what Triton's HTTP server answers for ALREADY_EXISTS) with Triton's
    gRPC status, ALREADY_EXISTS."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True)
class Region:
    """One registered region: ``byte_size`` bytes at ``offset`` of the
    segment ``key``, whose file is ``path`` (``/dev/shm/<key without its
    leading "/">``). Open ``path`` without following links (``O_NOFOLLOW``):
    it was a regular file when registered."""

    name: str
    key: str
    path: str
    offset: int
    byte_size: int


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class RegionTable:
    """The system shared memory regions of one API server, by name.

    Methods are synchronous and never wait: the table is used from one event
    loop, so each call sees and leaves it consistent.
    """

    def __init__(self, directory: str = SHM_DIR, max_regions: int = MAX_REGIONS) -> None:
        self._directory = directory
        self._max = max_regions
        self._regions: dict[str, Region] = {}

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        """Check and add a region; return it.

        Raises InvalidArgument (a missing or overlong name, a bad key, a
        segment that cannot be used, offset and size out of bounds),
        RegionExists (the name is taken) or Overloaded (the table is full).
        """
        if not name:
            raise InvalidArgument(NEED_NAME)
        if len(name) > MAX_NAME:
            raise InvalidArgument(
                f"cannot register shared memory region '{name[:64]}...': a region name is"
                f" at most {MAX_NAME} characters"
            )
        if name in self._regions:
            raise RegionExists(f"shared memory region '{name}' already in manager")
        if len(self._regions) >= self._max:
            raise Overloaded(
                f"cannot register shared memory region '{name}': this server holds"
                f" {self._max} regions already (its limit); unregister some first"
            )
        path = self._path(name, key)
        if not _is_count(offset) or not _is_count(byte_size):
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': invalid args (offset and"
                f" byte_size must be non-negative integers, got {offset!r} and {byte_size!r})"
            )
        if byte_size == 0:
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': invalid args"
                " (byte_size must not be 0)"
            )
        size = self._segment_size(key, path)
        if offset + byte_size > size:
            raise InvalidArgument(
                f"failed to register shared memory region '{name}': invalid args (offset"
                f" {offset} + byte_size {byte_size} is beyond the end of segment '{key}',"
                f" {size} bytes)"
            )
        region = Region(name=name, key=key, path=path, offset=offset, byte_size=byte_size)
        self._regions[name] = region
        return region

    def unregister(self, name: str | None) -> list[Region]:
        """Remove the region ``name``, or every region when ``name`` is None or
        empty; return what was removed. An unknown name removes nothing and is
        no error (Triton's behaviour)."""
        if not name:
            removed = list(self._regions.values())
            self._regions.clear()
            return removed
        region = self._regions.pop(name, None)
        return [] if region is None else [region]

    def status(self, name: str | None) -> list[Region]:
        """Every region sorted by name (``name`` None or empty), or the one
        named; NotFound in Triton's words for an unknown name."""
        if not name:
            return sorted(self._regions.values(), key=lambda r: r.name)
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [region]

    def resolve(self, name: str) -> Region:
        """The region an inference input or output names; NotFound in
        Triton's words when there is none."""
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"Unable to find shared memory region: '{name}'")
        return region

    # ----------------------------------------------------------------- checks

    def _path(self, name: str, key: str) -> str:
        """The segment's file for ``key``; InvalidArgument unless the key is a
        plain name in the directory."""

        def invalid(why: str) -> InvalidArgument:
            return InvalidArgument(
                f"cannot register shared memory region '{name}' - invalid shm key '{key}': {why}"
            )

        if not isinstance(key, str):
            raise invalid("the key must be a string")
        plain = key.lstrip("/")
        if not plain:
            raise invalid("the key names no segment (it should look like '/my_segment')")
        if "/" in plain or plain in (".", "..") or "\0" in plain:
            raise invalid(f"the key must be a plain name of a segment in {self._directory}")
        if len(plain.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
            raise invalid(f"the key is longer than {_MAX_KEY_BYTES} bytes")
        return os.path.join(self._directory, plain)

    @staticmethod
    def _segment_size(key: str, path: str) -> int:
        """The size of the segment at ``path``; InvalidArgument in Triton's
        words (``Unable to open shared memory region``) saying why it cannot
        be used."""

        def unusable(why: str) -> InvalidArgument:
            return InvalidArgument(f"Unable to open shared memory region: '{key}' ({why})")

        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise unusable(f"{path} does not exist; create the segment first") from None
        except OSError as exc:
            raise unusable(f"{path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise unusable(f"{path} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise unusable(f"this server may not read and write {path}")
        return info.st_size
