"""``ObjectStore``: objects as files in one directory (the TTL sweeper's scan is in
``anyserve.objects.sweeper``).

The store is one directory (``/tmp/anyserve-objects`` by default; a shared NFS/NAS mount
when replicas run on several machines). File I/O goes through aiofiles, so the event loop
never blocks on the disk (imported at the first file operation: a process that never
touches an object does not load it).

Atomic writes
    ``create`` writes ``<root>/.tmp-obj-<hex>-<8 hex>`` (created exclusively, mode 0o600,
    never through a symlink), then ``os.replace``-s it to ``obj-<hex>.bin``. A reader can
    only name the final file, so it never sees a partial object; a writer killed mid-write
    leaves only the temporary file, which the sweeper removes once it is older than
    ``tmp_grace`` seconds. ``fsync=True`` additionally flushes the file and the directory
    to stable storage before ``create`` returns (off by default: objects are short-lived
    and atomicity against crashed processes does not need it, only power loss does).

Expiry
    An object is expired once its file's mtime is more than ``ttl`` seconds in the past
    (the mtime is set when it is written, reads do not extend it). ``get`` raises
    ``NotFound`` saying so and ``exists`` answers False as soon as that happens, whether or
    not the sweeper has removed the file yet. Replicas sharing a store over NFS should have
    roughly synchronised clocks.

Safety
    Every file the store touches is ``<root>/<name>`` where ``<name>`` is an object file
    name ``obj-<hex>.bin`` or a temporary file name ``.tmp-obj-<hex>-<8 hex>``; object
    files are opened with ``O_NOFOLLOW`` and must be regular files, so a symlink planted in
    the root (to anywhere) is ``InvalidArgument`` and is never followed, removed through or
    read. Nothing outside the root is read, written or deleted. The root is created with
    mode 0o700 when the store creates it; give it to one user.

Peers
    A store given ``peers`` (an ``anyserve.objects.peers.PeerFetcher``) fetches an object
    that ``get`` does not find from the replica that has it, into this directory, then
    reads it as usual. Only a missing object is fetched: an expired one stays expired.

Metrics
    ``create``, a ``get`` that returns a value and a peer fetch each bump this process's
    ``anyserve.metrics.worker.OBJECT_COUNTS`` (a worker ships them to its replica).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from anyserve.errors import InvalidArgument, NotFound, PayloadTooLarge
from anyserve.metrics.worker import OBJECT_COUNTS
from anyserve.objects.format import HEADER_LEN, _decode, _encode, _header, _parse_header
from anyserve.objects.ref import (
    ObjRef,
    RefLike,
    _max_ref_len,
    _new_id,
    _parse_ref,
    _ref_under,
)
from anyserve.objects.sweeper import TMP_PREFIX, SweepReport, run_sweeper, sweep_directory

if TYPE_CHECKING:
    from anyserve.objects.peers import PeerFetch

__all__ = ["DEFAULT_ROOT", "ObjectStore"]

logger = logging.getLogger("anyserve.objects")

DEFAULT_ROOT = "/tmp/anyserve-objects"

_TMP_PREFIX = TMP_PREFIX  # transfer.py names its temporary files the same way

# Objects up to this size are read with one read call (header and payload together);
# bigger ones read the header first so that the payload is never copied again.
_ONE_READ_BYTES = 8 << 20

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _open_new(path: str, flags: int) -> int:
    """Opener for temporary files: exclusive, private, never through a symlink."""
    return os.open(path, flags | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)


def _open_existing(path: str, flags: int) -> int:
    """Opener for objects: refuses symlinks; O_NONBLOCK so a planted FIFO cannot hang us."""
    return os.open(path, flags | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_file_and_dir(fd: int, directory: Path) -> None:
    os.fsync(fd)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ObjectStore:
    """Objects as files in one directory, written atomically and expired after ``ttl``.

    ``root`` is made absolute (lexically) at construction; it is created, with mode 0o700
    and any missing parents, on the first ``create`` (and re-created if it disappears).
    Reading from a store whose root does not exist yet simply finds nothing.

    ``ttl`` (seconds, > 0): how long an object lives after it is written.
    ``max_object_size`` (bytes): ``create`` raises ``PayloadTooLarge`` when the encoded
    payload (excluding the 32-byte header) is larger. ``tmp_grace`` (seconds): how old a
    temporary file must be before ``sweep`` treats it as orphaned. ``fsync``: see the
    module docstring. ``peers``: where ``get`` fetches a missing object from (None, the
    default: nowhere, the directory is all there is); settable after construction.

    All methods are safe to call concurrently from many tasks of one event loop (and from
    several processes or machines sharing the directory).
    """

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        *,
        ttl: float = 3600.0,
        max_object_size: int | None = None,
        tmp_grace: float = 60.0,
        fsync: bool = False,
        peers: PeerFetch | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"ttl must be positive, got {ttl!r}")
        if not tmp_grace >= 0:
            raise ValueError(f"tmp_grace must be >= 0, got {tmp_grace!r}")
        if max_object_size is not None and max_object_size < 0:
            raise ValueError(f"max_object_size must be >= 0, got {max_object_size!r}")
        self._root = Path(os.path.abspath(os.fspath(root)))
        # The two spellings a full-path reference may use for the root.
        self._root_forms = frozenset({str(self._root), os.path.realpath(self._root)})
        self._max_ref_len = _max_ref_len(self._root_forms)
        self.ttl = float(ttl)
        self.max_object_size = max_object_size
        self.tmp_grace = float(tmp_grace)
        self.fsync = fsync
        self.peers = peers
        self._root_ready = False

    @property
    def root(self) -> Path:
        """The absolute store directory."""
        return self._root

    def __repr__(self) -> str:
        return f"ObjectStore({str(self._root)!r}, ttl={self.ttl})"

    # ------------------------------------------------------------------ references

    def parse_ref(self, value: RefLike) -> ObjRef:
        """Validate an untrusted reference and return it as an ``ObjRef`` of this store.

        Accepts an ``ObjRef`` (its id is re-checked and its path re-derived), or a
        ``str``/``bytes`` holding exactly ``obj-`` + 32 lowercase hex digits, or the full
        path ``<root>/obj-<hex>.bin`` with ``<root>`` spelled as this store's root (as
        configured, or resolved). Pure string checks: touches no file.

        Raises ``InvalidArgument`` (naming the value, truncated) for anything else.
        """
        return _parse_ref(value, self._root, self._root_forms, self._max_ref_len)

    def _ref(self, oid: str) -> ObjRef:
        return _ref_under(self._root, oid)

    def _expired(self, mtime: float, now: float) -> bool:
        return now - mtime > self.ttl

    # ------------------------------------------------------------------ operations

    async def create(self, data: Any) -> ObjRef:
        """Store ``data`` under a fresh reference and return it.

        The object is visible (to ``get``/``exists``, in this and other processes) only
        once it is complete. Raises ``InvalidArgument`` for data of an unsupported type
        (see ``anyserve.objects.format``), ``PayloadTooLarge`` when ``max_object_size`` is
        set and exceeded, and ``OSError`` when the disk fails (e.g. ``ENOSPC``); in every
        failure, and on cancellation, the temporary file is removed and nothing is visible.
        (The final rename is shielded from cancellation: a cancellation that arrives
        during it takes effect right after, and the published object is left to expire.)
        """
        if self.max_object_size is not None and isinstance(data, bytes | bytearray | str):
            self._check_size(len(data))  # str: UTF-8 is never shorter; saves encoding it
        kind, payload = await _encode(data)
        size = memoryview(payload).nbytes
        if self.max_object_size is not None:
            self._check_size(size)
        ref = self._ref(_new_id())
        header = _header(kind)
        await self._ensure_root()
        try:
            await self._write(ref, header, payload)
        except FileNotFoundError:
            # The root vanished (a /tmp cleaner?) or the sweeper took a stalled temp file.
            self._root_ready = False
            await self._ensure_root()
            await self._write(ref, header, payload)
        OBJECT_COUNTS.created += 1
        return ref

    def _check_size(self, size: int) -> None:
        assert self.max_object_size is not None
        if size > self.max_object_size:
            raise PayloadTooLarge(
                f"object of {size} bytes is over the limit of {self.max_object_size} bytes"
            )

    async def _ensure_root(self) -> None:
        if not self._root_ready:
            import aiofiles.os

            await aiofiles.os.makedirs(self._root, mode=0o700, exist_ok=True)
            self._root_ready = True

    async def _write(
        self, ref: ObjRef, header: bytes, payload: bytes | bytearray | memoryview
    ) -> None:
        import aiofiles.os

        tmp = self._root / f"{_TMP_PREFIX}{ref.id}-{secrets.token_hex(4)}"
        try:
            f = await aiofiles.open(tmp, "xb", opener=_open_new)
            try:
                await f.writelines((header, payload))
                if self.fsync:
                    await f.flush()
                    await anyio.to_thread.run_sync(_fsync_file_and_dir, f.fileno(), self._root)
            finally:
                with anyio.CancelScope(shield=True):
                    await f.close()
            with anyio.CancelScope(shield=True):
                await aiofiles.os.replace(tmp, ref.path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    async def get(self, ref: RefLike, *, source: str | None = None) -> Any:
        """Return the stored value, of the type it was stored as.

        The kinds and what each comes back as are listed in ``anyserve.objects.format``.
        With ``peers``, an object missing here is first fetched from the replica that has
        it (``source``: the endpoint of the replica the request came from, a hint).

        Raises ``InvalidArgument`` for a malformed reference or when the object file is a
        symlink or not a regular file, ``NotFound`` (naming the reference) when it does not
        exist (here nor at any peer) or has expired, ``AnyServeError`` when the file is not
        a valid object, and what the fetch raises (``PayloadTooLarge``, ``AnyServeError``
        for a failed checksum) when a peer's copy is refused.
        """
        r = self.parse_ref(ref)
        f = await self._open(r)
        # The request path stays lean: a peer is asked only when the object is missing.
        if f is None and self.peers is not None and await self.peers.fetch(self, r, source):
            OBJECT_COUNTS.fetched += 1
            f = await self._open(r)
        if f is None:
            raise NotFound(f"object {r.id} not found")
        try:
            st = os.fstat(f.fileno())
            self._check_stat(r, st)
            if self._expired(st.st_mtime, time.time()):
                raise NotFound(f"object {r.id} not found: it expired (ttl {self.ttl:g} s)")
            payload: bytes | memoryview
            if st.st_size <= _ONE_READ_BYTES:
                # One executor round trip instead of two; slicing a small payload is cheaper.
                raw = await f.readall()
                header, payload = raw[:HEADER_LEN], memoryview(raw)[HEADER_LEN:]
            else:
                header = await f.read(HEADER_LEN)
                payload = await f.readall()
            kind = _parse_header(r, header)
        finally:
            with anyio.CancelScope(shield=True):
                await f.close()
        value = await _decode(r, kind, payload)
        OBJECT_COUNTS.read += 1
        return value

    async def _open(self, r: ObjRef) -> Any:
        """The object's file opened for reading, or None when it does not exist."""
        import aiofiles

        try:
            return await aiofiles.open(r.path, "rb", buffering=0, opener=_open_existing)
        except FileNotFoundError:
            return None
        except OSError:
            # O_NOFOLLOW refuses a symlink (ELOOP), FileIO a directory (EISDIR): _lstat
            # turns those into InvalidArgument; anything else (EACCES, ...) propagates.
            if await self._lstat(r) is None:
                return None
            raise

    async def exists(self, ref: RefLike) -> bool:
        """True if the object exists here and has not expired (peers are not asked).

        Raises ``InvalidArgument`` for a malformed reference or a symlink/non-regular file.
        """
        r = self.parse_ref(ref)
        st = await self._lstat(r)
        return st is not None and not self._expired(st.st_mtime, time.time())

    async def delete(self, ref: RefLike) -> bool:
        """Remove the object; True if a live object was removed, False if it was absent.

        An expired object's file is removed too, but reported as False (it was already
        gone as far as ``get`` is concerned). Raises ``InvalidArgument`` for a malformed
        reference or when the name is a symlink or not a regular file (nothing is removed).
        """
        r = self.parse_ref(ref)
        st = await self._lstat(r)
        if st is None:
            return False
        import aiofiles.os

        try:
            await aiofiles.os.unlink(r.path)
        except FileNotFoundError:
            return False
        return not self._expired(st.st_mtime, time.time())

    async def _lstat(self, r: ObjRef) -> os.stat_result | None:
        import aiofiles.os

        try:
            st = await aiofiles.os.stat(r.path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        self._check_stat(r, st)
        return st

    def _check_stat(self, r: ObjRef, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            raise self._symlink_error(r)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"object reference {r.id} does not name a regular file")

    @staticmethod
    def _symlink_error(r: ObjRef) -> InvalidArgument:
        return InvalidArgument(f"object reference {r.id} names a symlink; refusing to follow it")

    # ------------------------------------------------------------------ sweeping

    async def sweep(self, now: float | None = None) -> int:
        """Remove expired objects and orphaned temporary files; return how many.

        An object is removed once ``now - mtime > ttl``; a temporary file once
        ``now - mtime > tmp_grace`` (an active writer keeps its mtime fresh). ``now``
        defaults to ``time.time()``. Only regular files whose names match the store's
        patterns are considered: symlinks and foreign files are left alone. Runs in a
        worker thread (one directory scan); files removed concurrently are skipped.
        """
        return (await self.sweep_report(now)).removed

    async def sweep_report(self, now: float | None = None) -> SweepReport:
        """:meth:`sweep`, returning what it removed and the objects and bytes it left."""
        when = time.time() if now is None else now
        report = await anyio.to_thread.run_sync(
            sweep_directory, self._root, self.ttl, self.tmp_grace, when
        )
        if report.removed:
            logger.debug("object sweep removed %d file(s) from %s", report.removed, self._root)
        return report

    async def run_sweeper(
        self, interval: float = 60.0, on_sweep: Callable[[SweepReport], None] | None = None
    ) -> None:
        """Sweep now and then every ``interval`` seconds, forever, handing each
        :class:`~anyserve.objects.sweeper.SweepReport` to ``on_sweep`` (the replica's
        metrics). A failing sweep is logged and retried next time; cancellation
        propagates (run it in a task group and cancel the group to stop it).
        ``ValueError`` unless ``interval > 0``.
        """
        await run_sweeper(self.sweep_report, interval, on_sweep, self._root)
