"""The shared object store: large values passed between replicas by reference.

A handler stores a value and passes the reference along instead of the bytes::

    ref = await context.objects.create(image_bytes)          # async handler
    await context.call(capability={"type": "embed"}, inputs={"data": ref})
    ...
    data = anyserve.objects.get(ref)                         # sync handler, other replica

The store is one directory (``/tmp/anyserve-objects`` by default; a shared NFS/NAS mount
when replicas run on several machines). File I/O goes through aiofiles, so the event loop
never blocks on the disk.

References
    A reference is opaque: ``obj-`` followed by 32 lowercase hex digits (128 random bits).
    It travels as a string (``str(ref)``, and as a BYTES tensor element through
    ``__anyserve_wire__``). References arrive from the network, so ``parse_ref`` accepts only
    that exact form, or the seed's full path ``<root>/obj-<hex>.bin`` when ``<root>`` is this
    store's root written the same way (as configured or fully resolved). Everything else --
    other directories, ``..``, percent-encoded traversal, NUL bytes, uppercase hex, empty or
    over-long values -- is ``InvalidArgument``. Uppercase hex is rejected rather than folded,
    because file names are case-sensitive and a reference has exactly one spelling.

On-disk format
    An object ``obj-<hex>`` lives in ``<root>/obj-<hex>.bin``: a fixed 32-byte ASCII header
    line, then the payload::

        b"anyserve-object/1 " + kind.ljust(13) + b"\\n"      (18 + 13 + 1 = 32 bytes)

    ``kind`` (and the payload after the header) is one of

    ``bytes``      the raw bytes (also used for ``memoryview`` data; ``get`` returns ``bytes``)
    ``bytearray``  the raw bytes; ``get`` returns a ``bytearray``
    ``str``        UTF-8 with ``surrogatepass`` (every Python ``str`` round-trips)
    ``json``       UTF-8 JSON of ``dict``/``list``/``int``/``float``/``bool``/``None`` values
                   (dict keys must be ``str``; tuples come back as lists)
    ``npy``        a numpy array in ``.npy`` format, written and read with
                   ``allow_pickle=False`` (object arrays are refused)

    Nothing is ever pickled. numpy is optional: it is only imported to read an ``npy``
    object, and an array is recognised by ``isinstance`` against an already imported numpy.

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
    Every file the store touches is ``<root>/<name>`` where ``<name>`` matches the patterns
    above; object files are opened with ``O_NOFOLLOW`` and must be regular files, so a
    symlink planted in the root (to anywhere) is ``InvalidArgument`` and is never followed,
    removed through or read. Nothing outside the root is read, written or deleted. The
    root is created with mode 0o700 when the store creates it; give it to one user.

Handlers use the module-level ``create``/``get``/``delete``/``exists``, which delegate to
the facade bound (``bind``) for the current request: awaitable in async handlers, blocking
(``BlockingObjects``) in sync handlers that run in anyio worker threads.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import io
import json
import logging
import os
import re
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import aiofiles
import aiofiles.os
import anyio
import anyio.from_thread
import anyio.to_thread

from anyserve.errors import AnyServeError, InvalidArgument, NotFound, PayloadTooLarge

__all__ = [
    "DEFAULT_ROOT",
    "HEADER_LEN",
    "AsyncObjects",
    "BlockingObjects",
    "ObjRef",
    "ObjectStore",
    "RefLike",
    "bind",
    "create",
    "delete",
    "exists",
    "get",
    "reset",
]

logger = logging.getLogger("anyserve.objects")

DEFAULT_ROOT = "/tmp/anyserve-objects"

_ID_RE = re.compile(r"obj-[0-9a-f]{32}")
_OBJ_FILE_RE = re.compile(r"obj-[0-9a-f]{32}\.bin")
_TMP_PREFIX = ".tmp-"
_TMP_FILE_RE = re.compile(r"\.tmp-obj-[0-9a-f]{32}-[0-9a-f]{8}")
_MAX_REF_LEN = 255

_MAGIC = b"anyserve-object/1 "
_KIND_WIDTH = 13
HEADER_LEN = len(_MAGIC) + _KIND_WIDTH + 1  # 32
_KINDS = frozenset({"bytes", "bytearray", "str", "json", "npy"})

# Encoding/decoding a value bigger than this runs in a worker thread, not on the loop.
_OFFLOAD_BYTES = 1 << 20
# Objects up to this size are read with one read call (header and payload together);
# bigger ones read the header first so that the payload is never copied again.
_ONE_READ_BYTES = 8 << 20

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


# --------------------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class ObjRef:
    """An immutable reference to one object: ``id`` plus where it lives in a store.

    ``str(ref)`` and ``ref.__anyserve_wire__()`` are the id; equality and hashing use the
    id only (the same object seen through two mounts of a shared store is one reference).
    ``path`` is ``<store root>/<id>.bin`` of the store that produced the reference; stores
    never trust it and always re-derive the path from the id.

    Raises ``InvalidArgument`` when ``id`` is not ``obj-`` + 32 lowercase hex digits or
    ``path`` is not named ``<id>.bin``.
    """

    id: str
    path: Path = field(compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise InvalidArgument(f"invalid object id {_show(self.id)}")
        if self.path.name != f"{self.id}.bin":
            raise InvalidArgument(f"object path {str(self.path)!r} does not match {self.id}")

    def __str__(self) -> str:
        return self.id

    def __anyserve_wire__(self) -> str:
        """The id, as it travels in a BYTES tensor element."""
        return self.id


#: What a reference argument may be: an ``ObjRef``, or its id (or seed path) as text/bytes.
RefLike: TypeAlias = ObjRef | str | bytes | bytearray | memoryview


def _show(value: object, limit: int = 64) -> str:
    """A short, printable rendering of an untrusted value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _new_id() -> str:
    return "obj-" + secrets.token_hex(16)


# --------------------------------------------------------------------------- encoding


def _numpy() -> Any:
    return importlib.import_module("numpy")


def _is_ndarray(data: object) -> bool:
    # An array can only exist if numpy was imported; never import it just to check.
    np = sys.modules.get("numpy")
    return np is not None and isinstance(data, np.ndarray)


def _encode_npy(arr: Any) -> memoryview:
    buf = io.BytesIO()
    try:
        _numpy().save(buf, arr, allow_pickle=False)
    except ValueError as exc:  # object arrays need pickle
        raise InvalidArgument(f"cannot store this numpy array without pickle: {exc}") from None
    return buf.getbuffer()


def _check_json_keys(value: Any) -> None:
    # Runs after json.dumps succeeded, so the structure is known to be acyclic.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidArgument(
                        f"JSON object keys must be str, not {type(key).__name__} ({_show(key)})"
                    )
                stack.append(child)
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _encode_json(data: Any) -> bytes:
    try:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"value is not JSON-serialisable: {exc}") from None
    _check_json_keys(data)
    return text.encode("utf-8", "surrogatepass")


async def _encode(data: Any) -> tuple[str, bytes | bytearray | memoryview]:
    """Turn ``data`` into ``(kind, payload)``; ``InvalidArgument`` for unsupported data."""
    if isinstance(data, bytes):
        return "bytes", data
    if isinstance(data, bytearray):
        return "bytearray", data
    if isinstance(data, memoryview):
        view = data if data.c_contiguous else memoryview(data.tobytes())
        return "bytes", view.cast("B")
    if isinstance(data, str):
        if len(data) > _OFFLOAD_BYTES:
            encoded = await anyio.to_thread.run_sync(data.encode, "utf-8", "surrogatepass")
        else:
            encoded = data.encode("utf-8", "surrogatepass")
        return "str", encoded
    if _is_ndarray(data):
        if data.nbytes > _OFFLOAD_BYTES:
            return "npy", await anyio.to_thread.run_sync(_encode_npy, data)
        return "npy", _encode_npy(data)
    if data is None or isinstance(data, bool | int | float | dict | list | tuple):
        return "json", _encode_json(data)
    raise InvalidArgument(
        f"cannot store a {type(data).__name__}: objects hold bytes, str, "
        "JSON values (dict/list/int/float/bool/None) or numpy arrays"
    )


def _header(kind: str) -> bytes:
    return _MAGIC + kind.encode("ascii").ljust(_KIND_WIDTH) + b"\n"


def _parse_header(ref: ObjRef, header: bytes) -> str:
    if len(header) == HEADER_LEN and header.startswith(_MAGIC) and header.endswith(b"\n"):
        kind = header[len(_MAGIC) : -1].rstrip(b" ").decode("ascii", "replace")
        if kind in _KINDS:
            return kind
    raise AnyServeError(f"object {ref.id} is corrupt: bad header")


def _decode_sync(ref: ObjRef, kind: str, payload: bytes | memoryview) -> Any:
    try:
        if kind == "bytes":
            return bytes(payload)  # no copy when it already is bytes
        if kind == "bytearray":
            return bytearray(payload)
        if kind == "str":
            return str(payload, "utf-8", "surrogatepass")
        if kind == "json":
            return json.loads(str(payload, "utf-8", "surrogatepass"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AnyServeError(f"object {ref.id} is corrupt: {exc}") from None
    try:
        np = _numpy()
    except ImportError:
        raise InvalidArgument(
            f"object {ref.id} holds a numpy array but numpy is not installed"
        ) from None
    try:
        return np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise AnyServeError(f"object {ref.id} is corrupt: {exc}") from None


async def _decode(ref: ObjRef, kind: str, payload: bytes | memoryview) -> Any:
    if kind != "bytes" and len(payload) > _OFFLOAD_BYTES:
        return await anyio.to_thread.run_sync(_decode_sync, ref, kind, payload)
    return _decode_sync(ref, kind, payload)


# --------------------------------------------------------------------------- file helpers


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


# --------------------------------------------------------------------------- the store


class AsyncObjects(Protocol):
    """What an async handler's objects facade offers (``ObjectStore`` is one)."""

    async def create(self, data: Any) -> ObjRef: ...
    async def get(self, ref: RefLike) -> Any: ...
    async def delete(self, ref: RefLike) -> bool: ...
    async def exists(self, ref: RefLike) -> bool: ...


class ObjectStore:
    """Objects as files in one directory, written atomically and expired after ``ttl``.

    ``root`` is made absolute (lexically) at construction; it is created, with mode 0o700
    and any missing parents, on the first ``create`` (and re-created if it disappears).
    Reading from a store whose root does not exist yet simply finds nothing.

    ``ttl`` (seconds, > 0): how long an object lives after it is written.
    ``max_object_size`` (bytes): ``create`` raises ``PayloadTooLarge`` when the encoded
    payload (excluding the 32-byte header) is larger. ``tmp_grace`` (seconds): how old a
    temporary file must be before ``sweep`` treats it as orphaned. ``fsync``: see the
    module docstring.

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
        self._max_ref_len = max(_MAX_REF_LEN, max(map(len, self._root_forms)) + 64)
        self.ttl = float(ttl)
        self.max_object_size = max_object_size
        self.tmp_grace = float(tmp_grace)
        self.fsync = fsync
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
        if isinstance(value, ObjRef):
            return self._ref(value.id)
        if isinstance(value, bytes | bytearray | memoryview):
            if len(value) > self._max_ref_len:
                raise InvalidArgument(f"object reference too long ({len(value)} bytes)")
            try:
                text = bytes(value).decode("ascii")
            except UnicodeDecodeError:
                raise InvalidArgument(f"invalid object reference {_show(bytes(value))}") from None
        elif isinstance(value, str):
            text = value
        else:
            raise InvalidArgument(
                f"an object reference must be an ObjRef, str or bytes, not {type(value).__name__}"
            )
        if not text:
            raise InvalidArgument("empty object reference")
        if len(text) > self._max_ref_len:
            raise InvalidArgument(f"object reference too long ({len(text)} characters)")
        if _ID_RE.fullmatch(text):
            return self._ref(text)
        if text.startswith("/") and "\x00" not in text:
            head, _, name = text.rpartition("/")
            if head in self._root_forms and _OBJ_FILE_RE.fullmatch(name):
                return self._ref(name[: -len(".bin")])
        raise InvalidArgument(
            f"invalid object reference {_show(text)}: expected 'obj-' and 32 lowercase hex "
            f"digits, or a path inside {str(self._root)!r}"
        )

    def _ref(self, oid: str) -> ObjRef:
        return ObjRef(oid, self._root / f"{oid}.bin")

    def _expired(self, mtime: float, now: float) -> bool:
        return now - mtime > self.ttl

    # ------------------------------------------------------------------ operations

    async def create(self, data: Any) -> ObjRef:
        """Store ``data`` under a fresh reference and return it.

        The object is visible (to ``get``/``exists``, in this and other processes) only
        once it is complete. Raises ``InvalidArgument`` for data of an unsupported type
        (see the module docstring), ``PayloadTooLarge`` when ``max_object_size`` is set
        and exceeded, and ``OSError`` when the disk fails (e.g. ``ENOSPC``); in every
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
        return ref

    def _check_size(self, size: int) -> None:
        assert self.max_object_size is not None
        if size > self.max_object_size:
            raise PayloadTooLarge(
                f"object of {size} bytes is over the limit of {self.max_object_size} bytes"
            )

    async def _ensure_root(self) -> None:
        if not self._root_ready:
            await aiofiles.os.makedirs(self._root, mode=0o700, exist_ok=True)
            self._root_ready = True

    async def _write(
        self, ref: ObjRef, header: bytes, payload: bytes | bytearray | memoryview
    ) -> None:
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

    async def get(self, ref: RefLike) -> Any:
        """Return the stored value, of the type it was stored as (see the module docstring).

        Raises ``InvalidArgument`` for a malformed reference or when the object file is a
        symlink or not a regular file, ``NotFound`` (naming the reference) when it does not
        exist or has expired, ``AnyServeError`` when the file is not a valid object.
        """
        r = self.parse_ref(ref)
        try:
            f = await aiofiles.open(r.path, "rb", buffering=0, opener=_open_existing)
        except FileNotFoundError:
            raise NotFound(f"object {r.id} not found") from None
        except OSError:
            # O_NOFOLLOW refuses a symlink (ELOOP), FileIO a directory (EISDIR): _lstat
            # turns those into InvalidArgument; anything else (EACCES, ...) propagates.
            if await self._lstat(r) is None:
                raise NotFound(f"object {r.id} not found") from None
            raise
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
        return await _decode(r, kind, payload)

    async def exists(self, ref: RefLike) -> bool:
        """True if the object exists and has not expired.

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
        try:
            await aiofiles.os.unlink(r.path)
        except FileNotFoundError:
            return False
        return not self._expired(st.st_mtime, time.time())

    async def _lstat(self, r: ObjRef) -> os.stat_result | None:
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
        when = time.time() if now is None else now
        removed = await anyio.to_thread.run_sync(self._sweep_sync, when)
        if removed:
            logger.debug("object sweep removed %d file(s) from %s", removed, self._root)
        return removed

    def _sweep_sync(self, now: float) -> int:
        removed = 0
        try:
            entries = os.scandir(self._root)
        except FileNotFoundError:
            return 0
        with entries:
            for entry in entries:
                if _OBJ_FILE_RE.fullmatch(entry.name):
                    max_age = self.ttl
                elif _TMP_FILE_RE.fullmatch(entry.name):
                    max_age = self.tmp_grace
                else:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= max_age:
                        continue
                    os.unlink(self._root / entry.name)
                except FileNotFoundError:
                    continue
                removed += 1
        return removed

    async def run_sweeper(self, interval: float = 60.0) -> None:
        """Sweep now and then every ``interval`` seconds, forever.

        A failing sweep is logged and retried next time; cancellation propagates (run it
        in a task group and cancel the group to stop it). ``ValueError`` unless
        ``interval > 0``.
        """
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("sweeping the object store %s failed", self._root)
            await anyio.sleep(interval)


# --------------------------------------------------------------------------- sync facade


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
