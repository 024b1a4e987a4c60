"""The shared object store: large values passed between replicas by reference.

A handler stores a value and passes the reference along instead of the bytes::

    ref = await context.objects.create(image_bytes)          # async handler
    await context.call(capability={"type": "embed"}, inputs={"data": ref})
    ...
    data = anyserve.objects.get(ref)                         # sync handler, other replica

The store is one directory (``/tmp/anyserve-objects`` by default; a shared NFS/NAS mount
when replicas run on several machines), written atomically and expired after a TTL.
Replicas on several machines without a shared mount each have their own directory and
fetch an object they do not have from the replica that created it (``peers``).

The package is split by what each part holds:

``anyserve.objects.ref``       ``ObjRef``, ``RefLike``: what a reference may look like
``anyserve.objects.format``    the on-disk format and the kinds of values it holds
``anyserve.objects.store``     ``ObjectStore``: atomic writes, expiry, safety
``anyserve.objects.sweeper``   the TTL sweeper's directory scan, and what it measures
``anyserve.objects.blocking``  ``BlockingObjects`` and the per-request ``create``/``get``/
                               ``delete``/``exists``/``bind``/``reset`` used by handlers
``anyserve.objects.transfer``  one object's file sent and received in checked chunks
``anyserve.objects.service``   the replica's ``Objects.Fetch`` gRPC service
``anyserve.objects.peers``     ``PeerFetcher``: finding and fetching a missing object

Everything public is importable from ``anyserve.objects`` itself.
"""

from __future__ import annotations

from anyserve.objects.blocking import (
    AsyncObjects,
    BlockingObjects,
    bind,
    create,
    delete,
    exists,
    get,
    reset,
)
from anyserve.objects.format import HEADER_LEN
from anyserve.objects.ref import ObjRef, RefLike
from anyserve.objects.store import DEFAULT_ROOT, ObjectStore

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
