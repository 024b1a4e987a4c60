"""Keeping a long-running process's resident memory flat.

glibc's malloc serves a request of 128 KiB or more with its own ``mmap``,
returned to the system on ``free``, but it raises that threshold after each
such free (up to 32 MiB) to save system calls. A server that parses and drops
multi-MiB bodies then serves them from its heap, whose freed space is rarely
returned: the resident size ratchets up with the largest burst of bodies seen
and stays there (a five-minute soak saw an idle API server at 80 MiB after one
run and 180 MiB after another). Fixing the threshold turns that off.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
from functools import cache

import anyio

log = logging.getLogger("anyserve.memory")

# mallopt parameter numbers, from glibc's malloc.h.
_M_MMAP_THRESHOLD = -3
#: Allocations of at least this many bytes get their own mapping, given back on free.
MMAP_THRESHOLD = 128 * 1024
#: Seconds between two returns of the heap's free pages (:func:`trim_forever`).
TRIM_INTERVAL = 10.0


def skip_httpx_cli() -> None:
    """Keep httpx from importing its own command line in this process.

    httpx imports it (rich and pygments: ~5 MiB resident) whenever they are
    installed, and typer installs them. anyserve's server processes never run
    it (the ``httpx`` script is a process of its own), so their HTTP clients
    cost what an HTTP client does; ``httpx.main`` is then httpx's stub saying
    the command line's dependencies are missing. Called at a process's start,
    before httpx is imported; a library import of anyserve leaves httpx alone.
    """
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


@cache
def libc() -> ctypes.CDLL | None:
    """The C library this process runs on (its own symbols: no library search,
    which would run ``ldconfig``), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


#: Allocations between two collections of the youngest generation (Python's
#: default is 700).
GC_YOUNG_THRESHOLD = 10_000


def settle_gc() -> None:
    """Once a server has started: what it imported and built stays for its
    life, so it leaves the collector's generations (``gc.freeze``), and the
    youngest generation is collected every 10,000 allocations instead of 700.
    Serving small requests, the API server otherwise ran a collection every
    ~44 requests (about 9 us a request). Only for a process that is nothing
    but a server: frozen objects that later form garbage cycles stay."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def return_big_blocks() -> bool:
    """Make glibc return every freed allocation of :data:`MMAP_THRESHOLD`
    bytes or more to the system at once (a fixed mmap threshold). Returns
    whether it applied; never raises (other C libraries keep their own policy)."""
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:  # not Linux, or not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not applied:
        log.debug("mallopt(M_MMAP_THRESHOLD) was refused; keeping the C library's policy")
    return applied


async def trim_forever(interval: float = TRIM_INTERVAL) -> None:
    """Every ``interval`` seconds, give the free pages inside the heap back to
    the system (glibc's ``malloc_trim``), until cancelled; returns at once
    without glibc.

    The fixed mmap threshold covers big blocks; what it leaves is the heap's
    own fragmentation: a burst of mid-sized allocations (parsed bodies,
    protobuf messages, gRPC buffers) frees pages between live objects that
    glibc only returns from the heap's top. Soaks of five minutes grew an idle
    API server or replica by 8-18% without this and stayed within 4% with it;
    one pass over a server's heap takes well under a millisecond.
    """
    trim = getattr(libc(), "malloc_trim", None)
    if trim is None:
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    while True:
        await anyio.sleep(interval)
        trim(0)
