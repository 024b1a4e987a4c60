"""Tensors passed by reference through shared memory, between processes on one host.

One mechanism serves two uses:

* the API server puts a big input tensor (at least ``--shm-threshold`` bytes)
  of a request bound for a replica on its own host into a *segment* it
  creates, and asks for big outputs to come back the same way, so the tensor
  is not copied through gRPC, the replica and the worker socket;
* a client uses Triton's system shared memory extension: it registers a
  region of its own ``/dev/shm`` segment and names it in an input or a
  requested output (``shared_memory_region``, ``shared_memory_byte_size``,
  ``shared_memory_offset``).

Either way the API server (the only process that may decide it) writes the
same three internal parameters on the tensor: :data:`PATH` (the segment's
file), :data:`OFFSET` (from the file's start) and :data:`SIZE`. A worker maps
an input's bytes read-only (numpy arrays over them are zero-copy views) and
writes an output's bytes into its place. Requests that carry these parameters
from outside are refused by the API server (it knows which files it put there).

Segments the API server creates are files named
``anyserve-<pid>-<start time>-<call>[-<output>]`` in ``/dev/shm``: the pid and
start time of the API server that owns them (the one that deletes them when
the call ends). :func:`sweep` deletes the segments of owners that no longer
run, so a process killed mid-call leaks nothing for long; the API server and
every replica run it periodically.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

import anyio

from anyserve.errors import InvalidArgument, NotFound

__all__ = [
    "OFFSET",
    "OUTPUTS",
    "OUTPUTS_MIN",
    "PATH",
    "REGION",
    "REGION_OFFSET",
    "REGION_SIZE",
    "RESERVED",
    "SHM_DIR",
    "SIZE",
    "Ref",
    "create",
    "host_id",
    "own_segments",
    "owner_alive",
    "owner_tag",
    "segment_owner",
    "sweep",
    "sweep_forever",
    "unlink_quietly",
]

SHM_DIR = "/dev/shm"
#: Internal tensor parameters (set only by the API server): where the bytes are.
PATH = "anyserve-shm-path"
OFFSET = "anyserve-shm-offset"
SIZE = "anyserve-shm-size"
#: Internal request parameter: the name prefix for output segments the worker
#: creates for outputs of at least :data:`OUTPUTS_MIN` bytes.
OUTPUTS = "anyserve-shm-outputs"
OUTPUTS_MIN = "anyserve-shm-outputs-min"
#: Every internal parameter starts with this; clients may not send them.
RESERVED = "anyserve-shm"
# Triton's parameters (system shared memory extension).
REGION = "shared_memory_region"
REGION_SIZE = "shared_memory_byte_size"
REGION_OFFSET = "shared_memory_offset"

#: Seconds between sweeps of segments whose owner has gone.
SWEEP_INTERVAL = 5.0

log = logging.getLogger("anyserve.shm")
_PREFIX = "anyserve-"
_NAME = re.compile(r"anyserve-(\d+)-(\d+)-\d+(?:-\d+)?")
_PAGE = mmap.ALLOCATIONGRANULARITY


@cache
def host_id() -> str:
    """What identifies this host's ``/dev/shm`` to other processes: the boot id
    and the shared-memory file system's device. Two processes with the same
    value can open each other's segments (a container with its own
    ``/dev/shm`` has another device). Empty when there is no ``/dev/shm``."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        device = os.stat(SHM_DIR).st_dev
    except OSError:
        return ""
    return f"{boot}:{device}"


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (``/proc/<pid>/stat``
    field 22), which tells a pid's owner from a later process reusing it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces: count fields after its ")".
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


@cache
def owner_tag() -> str:
    """This process's ``<pid>-<start time>``, the owner part of segment names."""
    pid = os.getpid()
    return f"{pid}-{_start_time(pid) or 0}"


def owner_alive(pid: int, start: int) -> bool:
    """Whether the process that created a segment still runs."""
    return _start_time(pid) == start


def segment_owner(name: str) -> tuple[int, int] | None:
    """``(pid, start time)`` of an anyserve segment's file name, else None."""
    found = _NAME.fullmatch(name)
    return None if found is None else (int(found[1]), int(found[2]))


def sweep() -> list[str]:
    """Delete the segments whose owner no longer runs; return their names.
    Never raises (another process may sweep the same file at once)."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(_PREFIX) or (owner := segment_owner(name)) is None:
            continue
        if not owner_alive(*owner):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except OSError:
                continue
            removed.append(name)
    return removed


async def sweep_forever(interval: float = SWEEP_INTERVAL) -> None:
    """Run :func:`sweep` every ``interval`` seconds until cancelled, logging
    what it deleted (a process died holding those)."""
    while True:
        removed = sweep()
        if removed:
            log.info("deleted %d shared memory segments of processes that are gone", len(removed))
        await anyio.sleep(interval)


def own_segments(prefix: str) -> Iterator[str]:
    """Paths of existing segments whose names start with ``prefix``."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            yield os.path.join(SHM_DIR, name)


def unlink_quietly(path: str) -> None:
    """Delete a segment; one that is gone already is not an error."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def create(path: str, pieces: list[Any]) -> int:
    """Create the segment ``path`` (it must not exist) holding ``pieces``
    (bytes-like) one after another; return its size. Raises OSError (a full
    ``/dev/shm`` is ENOSPC); nothing is left behind when it raises."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        total = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view:
                written = os.write(fd, view)
                total += written
                view = view[written:]
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)
    return total


@dataclass(frozen=True, slots=True)
class Ref:
    """Where one tensor's bytes are: ``size`` bytes at ``offset`` of file ``path``."""

    path: str
    offset: int
    size: int

    @classmethod
    def of(cls, parameters: Any) -> Ref | None:
        """The reference in a tensor's parameters (a protobuf map), or None."""
        if PATH not in parameters:  # membership first: indexing inserts the key
            return None
        ref = cls(
            parameters[PATH].string_param,
            parameters[OFFSET].int64_param if OFFSET in parameters else 0,
            parameters[SIZE].int64_param if SIZE in parameters else 0,
        )
        inside = os.path.dirname(os.path.normpath(ref.path)) == SHM_DIR
        if not inside or ref.offset < 0 or ref.size < 0:
            raise InvalidArgument(f"malformed shared memory reference {ref}")
        return ref

    def stamp(self, parameters: Any) -> None:
        """Write this reference into a tensor's parameters."""
        parameters[PATH].string_param = self.path
        parameters[OFFSET].int64_param = self.offset
        parameters[SIZE].int64_param = self.size

    def _open(self, flags: int, what: str) -> int:
        try:
            fd = os.open(self.path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise NotFound(
                f"{what}: shared memory segment {self.path} cannot be opened: {exc.strerror}"
            ) from None
        if os.fstat(fd).st_size < self.offset + self.size:
            os.close(fd)
            raise InvalidArgument(
                f"{what}: shared memory segment {self.path} is smaller than offset"
                f" {self.offset} + {self.size} bytes"
            )
        return fd

    def map(self, what: str) -> memoryview:
        """The bytes, mapped read-only (no copy). The mapping lives as long as
        the view and anything made from it (a numpy array), even after the
        file is deleted. Raises NotFound / InvalidArgument naming ``what``."""
        if not self.size:
            return memoryview(b"")
        fd = self._open(os.O_RDONLY, what)
        try:
            start = self.offset - self.offset % _PAGE
            mapped = mmap.mmap(
                fd, self.offset + self.size - start, prot=mmap.PROT_READ, offset=start
            )
        finally:
            os.close(fd)
        skip = self.offset - start
        return memoryview(mapped)[skip : skip + self.size]

    def write(self, data: Any, what: str) -> int:
        """Write ``data`` at the reference (never past it, never growing the
        file); return its length. Raises InvalidArgument when it does not fit."""
        view = memoryview(data).cast("B")
        if len(view) > self.size:
            raise InvalidArgument(
                f"{what} is {len(view)} bytes but its shared memory holds only {self.size}"
            )
        fd = self._open(os.O_WRONLY, what)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], self.offset + done)
        finally:
            os.close(fd)
        return len(view)
