"""Handlers that misbehave the ways tests/test_worker_recycle.py needs: one
that ignores its cancellation, one that leaks memory, one that cuts its worker's
connection and lingers, and a well-behaved one. Each normal answer is the
worker's pid, so a test sees when a worker was replaced.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

#: MiB the ``leak`` handler keeps per call.
LEAK_MIB = 8
# Seconds a misbehaving handler goes on at most (so a test's leftovers end).
FOREVER = 60.0

app = AnyServe("recycle")
_leaked: list[bytes] = []


def _text(request: ModelInferRequest) -> str:
    return codec.input_text(request, "text_input") if request.inputs else ""


@app.capability(type="hang")
def hang(request: ModelInferRequest, context: Context) -> str:
    """``hang``: sleeps on, ignoring its cancellation (a sync thread nobody
    can stop); anything else: the pid."""
    if _text(request) == "hang":
        end = time.monotonic() + FOREVER
        while time.monotonic() < end:
            time.sleep(0.05)
    return str(os.getpid())


@app.capability(type="leak", workers=2, max_memory_mib=float(os.environ.get("LEAK_LIMIT", "1e6")))
def leak(request: ModelInferRequest, context: Context) -> str:
    """Keeps LEAK_MIB more MiB (written, so resident) on every call."""
    _leaked.append(b"\xff" * (LEAK_MIB * 2**20))
    return str(os.getpid())


@app.capability(type="linger")
def linger(request: ModelInferRequest, context: Context) -> str:
    """Shuts down its worker's socket to the replica, then lingers without
    exiting (as a worker stuck in its exit would)."""
    fd = int(sys.argv[sys.argv.index("--fd") + 1])
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    time.sleep(FOREVER)
    return "unreachable"


@app.capability(type="ok")
def ok(request: ModelInferRequest, context: Context) -> str:
    return str(os.getpid())
