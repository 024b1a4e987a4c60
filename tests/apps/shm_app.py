"""Handlers that report how their tensors reached them (shared memory tests)."""

from __future__ import annotations

import os
from typing import Any

import anyio
import numpy as np

from anyserve import AnyServe, Context, codec
from anyserve.proto import ModelInferRequest

app = AnyServe("shm")


@app.capability(type="scale", model="scale", zero_copy=True)
def scale(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    """``y = 2 * x``, with the facts a test checks: the size of the message
    that reached the worker, whether ``x`` is a read-only view of a mapping
    (not of bytes in the message), its sum, and the worker's pid."""
    x = codec.decode_inputs(request)["x"]
    owner = x.base
    while isinstance(owner, np.ndarray):
        owner = owner.base
    return {
        "y": x * 2,
        "message_bytes": np.array([request.ByteSize()], dtype=np.int64),
        "view": np.array([isinstance(owner, memoryview) and not x.flags.writeable]),
        "total": np.array([float(x.sum(dtype=np.float64))]),
        "pid": np.array([os.getpid()], dtype=np.int64),
    }


@app.capability(type="raw")
def raw(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    """Reads the protobuf itself, as handlers written against KServe's
    messages do: its first raw input's length and a checksum of it."""
    data = request.raw_input_contents[0]
    return {
        "length": np.array([len(data)], dtype=np.int64),
        "total": np.array([float(np.frombuffer(data, np.float32).sum(dtype=np.float64))]),
    }


@app.capability(type="hold")
async def hold(request: ModelInferRequest, context: Context) -> dict[str, Any]:
    """Holds its call (its input in shared memory) until cancelled."""
    x = codec.decode_inputs(request)["x"]
    await anyio.sleep(3600)
    return {"y": x}
