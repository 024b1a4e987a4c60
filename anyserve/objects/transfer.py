"""One stored object moved between two replicas' stores: the file, in chunks, checked.

What travels is the stored file exactly as it is on disk (the 32-byte header and the
payload), as a stream of ``ObjectChunk`` messages (``protos/objects.proto``): a first
message with the file's size and age, then the bytes in chunks of ``CHUNK_SIZE``, then
a last message with the SHA-256 of the whole file.

``send_chunks`` is the sending side (the replica's ``Objects.Fetch``), ``receive`` the
receiving side: it writes into a temporary file of the store, and only when the size,
the checksum and the header are right renames it into place, so a reader never sees a
partial or wrong object, and a failed transfer leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator

import anyio

from anyserve._proto import objects_pb2 as opb
from anyserve.errors import AnyServeError, NotFound, PayloadTooLarge
from anyserve.objects.format import HEADER_LEN, _parse_header
from anyserve.objects.ref import ObjRef, _ref_under
from anyserve.objects.store import (
    _TMP_PREFIX,
    ObjectStore,
    _fsync_file_and_dir,
    _open_existing,
    _open_new,
    _unlink_quietly,
)

__all__ = ["CHUNK_SIZE", "receive", "send_chunks"]

#: Bytes per data message: well under gRPC's message limit, few messages per object.
CHUNK_SIZE = 1 << 20


async def send_chunks(
    store: ObjectStore, oid: str, chunk_size: int = CHUNK_SIZE
) -> AsyncIterator[opb.ObjectChunk]:
    """The messages that carry object ``oid`` of ``store``: size and age, data, checksum.

    ``oid`` must be exactly ``obj-`` and 32 lowercase hex digits (no path form: a peer
    names objects, never files). Raises ``InvalidArgument`` for any other id or when the
    object file is a symlink or not a regular file, ``NotFound`` when the object is
    missing or expired, ``AnyServeError`` when the file changes size while being read.
    """
    import aiofiles  # here, as in the store: only a fetch needs it

    r = _ref_under(store.root, oid)  # ObjRef re-checks the id: InvalidArgument
    try:
        f = await aiofiles.open(r.path, "rb", buffering=0, opener=_open_existing)
    except OSError:
        # Missing (FileNotFoundError), or refused (symlink, directory): _lstat says which.
        if await store._lstat(r) is None:
            raise NotFound(f"object {r.id} not found") from None
        raise
    try:
        st = os.fstat(f.fileno())
        store._check_stat(r, st)
        now = time.time()
        if store._expired(st.st_mtime, now):
            raise NotFound(f"object {r.id} not found: it expired (ttl {store.ttl:g} s)")
        yield opb.ObjectChunk(size=st.st_size, age_seconds=max(0.0, now - st.st_mtime))
        digest = hashlib.sha256()
        sent = 0
        while data := await f.read(chunk_size):
            sent += len(data)
            digest.update(data)
            yield opb.ObjectChunk(data=data)
        if sent != st.st_size:  # objects are immutable once renamed into place
            raise AnyServeError(f"object {r.id} changed while it was being sent")
        yield opb.ObjectChunk(sha256=digest.digest())
    finally:
        with anyio.CancelScope(shield=True):
            await f.close()


async def receive(
    store: ObjectStore, ref: ObjRef, chunks: AsyncIterable[opb.ObjectChunk], *, source: str
) -> int:
    """Write the object that ``chunks`` carry into ``store`` as ``ref``; return its size.

    The announced size is checked against the store's ``max_object_size`` before
    anything is written, every byte past it is refused, the SHA-256 and the header are
    checked at the end; only then is the file renamed into place, with its mtime set so
    that it expires when the original does (by age; the local ``ttl`` applies).
    ``source`` only names the peer in errors. Raises ``PayloadTooLarge`` for an object
    over the limit, ``AnyServeError`` for a short or long stream, a checksum mismatch or
    a bad header, ``OSError`` when the disk fails; in every failure, and on
    cancellation, nothing is written (the temporary file is removed).
    """
    stream = aiter(chunks)
    first = await anext(stream, None)
    if first is None:
        raise AnyServeError(f"peer {source} sent nothing for object {ref.id}")
    size = first.size
    limit = store.max_object_size
    if limit is not None and size > limit + HEADER_LEN:
        raise PayloadTooLarge(
            f"object {ref.id} from {source} has {size - HEADER_LEN} bytes, over the limit"
            f" of {limit} bytes"
        )
    if size < HEADER_LEN:
        raise AnyServeError(f"object {ref.id} from {source} is corrupt: {size} bytes")
    await store._ensure_root()
    import aiofiles.os

    tmp = store.root / f"{_TMP_PREFIX}{ref.id}-{secrets.token_hex(4)}"
    try:
        f = await aiofiles.open(tmp, "xb", opener=_open_new)
        try:
            digest = hashlib.sha256()
            header = b""
            got = 0
            checksum: bytes | None = None
            async for chunk in stream:
                if checksum is not None:
                    raise AnyServeError(f"peer {source} sent data after the checksum")
                if chunk.data:
                    got += len(chunk.data)
                    if got > size:
                        raise AnyServeError(
                            f"peer {source} sent more than the {size} bytes it announced"
                            f" for object {ref.id}"
                        )
                    digest.update(chunk.data)
                    if len(header) < HEADER_LEN:
                        header += chunk.data[: HEADER_LEN - len(header)]
                    await f.write(chunk.data)
                if chunk.sha256:
                    checksum = chunk.sha256
            if got != size or checksum is None:
                raise AnyServeError(
                    f"peer {source} sent {got} of {size} bytes of object {ref.id}"
                    + ("" if checksum is not None else " and no checksum")
                )
            if not hmac.compare_digest(digest.digest(), checksum):
                raise AnyServeError(
                    f"object {ref.id} from {source} failed its checksum; nothing was stored"
                )
            _parse_header(ref, header)
            if store.fsync:
                await f.flush()
                await anyio.to_thread.run_sync(_fsync_file_and_dir, f.fileno(), store.root)
        finally:
            with anyio.CancelScope(shield=True):
                await f.close()
        # A hostile age (NaN, infinite, negative) must not break utime or extend the TTL.
        age = first.age_seconds if math.isfinite(first.age_seconds) else 0.0
        written = time.time() - min(max(0.0, age), store.ttl + 1.0)
        os.utime(tmp, (written, written))
        with anyio.CancelScope(shield=True):
            await aiofiles.os.replace(tmp, ref.path)
    except BaseException:
        with contextlib.suppress(OSError):
            _unlink_quietly(tmp)
        raise
    return size
