"""A worker's side of tensors in shared memory (see :mod:`anyserve.shm`).

Inputs: :func:`input_buffers` maps each input the API server placed in shared
memory read-only; the worker attaches the list to the request
(:func:`anyserve.codec.values.attached_inputs`) so decoding it gives numpy
views of the mapping, not copies. Outputs: :func:`place_outputs` writes an
output the client asked for in one of its regions into that region, and an
output of at least the request's :data:`~anyserve.shm.OUTPUTS_MIN` bytes into
a new segment the API server will read and delete. A numpy output of that size
goes into its segment as the response is built (:func:`output_diverter`),
from the array's own memory: one copy, not the four of taking its bytes,
putting them in the response, reading them back and writing them out.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from anyserve import shm
from anyserve.codec.responses import Divert, use_raw_outputs
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = ["input_buffers", "output_diverter", "place_outputs"]

log = logging.getLogger("anyserve.shm")

_OUTPUT_PREFIX = re.compile(r"anyserve-\d+-\d+-\d+")


def input_buffers(request: ModelInferRequest, zero_copy: bool) -> list[Any] | None:
    """Each input's raw bytes when any input is in shared memory (mapped
    views for those, ``raw_input_contents`` entries for the others), else None.

    Without ``zero_copy``, an input the API server placed in shared memory on
    its own (not a client's region) is also copied into its empty
    ``raw_input_contents`` entry, so the request looks as if it came over
    gRPC to code that reads the protobuf itself.

    Raises InvalidArgument when another input is not raw (the API server
    makes it so) and NotFound when a segment is gone.
    """
    for tensor in request.inputs:
        if shm.PATH in tensor.parameters:
            break
    else:
        return None  # the common case, checked without a Ref per input
    refs = [shm.Ref.of(tensor.parameters) for tensor in request.inputs]
    raw = request.raw_input_contents
    if raw and len(raw) != len(refs):
        raise InvalidArgument(
            f"request has {len(raw)} raw_input_contents entries for {len(refs)} inputs"
        )
    buffers: list[Any] = []
    for index, (tensor, ref) in enumerate(zip(request.inputs, refs, strict=True)):
        what = f"input {tensor.name!r}"
        if ref is None:
            if not raw:
                raise InvalidArgument(
                    f"{what}: beside inputs in shared memory, the others must be raw"
                )
            buffers.append(raw[index])
        elif not zero_copy and raw and shm.REGION not in tensor.parameters:
            data = bytes(ref.map(what))
            raw[index] = data
            buffers.append(data)  # not raw[index]: reading an entry back copies it
        elif tensor.datatype == "BYTES":
            buffers.append(bytes(ref.map(what)))  # split into bytes objects anyway
        else:
            buffers.append(ref.map(what))
    return buffers


def _output_prefix(request: ModelInferRequest) -> tuple[str, int]:
    params = request.parameters
    if shm.OUTPUTS not in params:  # membership first: indexing inserts the key
        return "", 0
    prefix = params[shm.OUTPUTS].string_param
    if not _OUTPUT_PREFIX.fullmatch(prefix):
        raise InvalidArgument(f"malformed {shm.OUTPUTS} parameter {prefix!r}")
    minimum = params[shm.OUTPUTS_MIN].int64_param if shm.OUTPUTS_MIN in params else 0
    return prefix, max(minimum, 1)


def _to_segment(prefix: str, index: int, data: Any, name: str, parameters: Any) -> bool:
    """Write ``data`` (bytes-like) into output ``index``'s segment of the call
    and stamp where it is on ``parameters``; False, with nothing written,
    when ``/dev/shm`` cannot take it (the bytes then go in the answer)."""
    path = os.path.join(shm.SHM_DIR, f"{prefix}-{index}")
    try:
        size = shm.create(path, [data])
    except OSError as exc:  # /dev/shm full
        log.warning("output %r stays in the answer: %s: %s", name, path, exc)
        return False
    shm.Ref(path, 0, size).stamp(parameters)
    return True


def output_diverter(request: ModelInferRequest) -> Divert | None:
    """What ``codec.to_infer_response(divert=...)`` takes: numpy outputs of at
    least the request's :data:`~anyserve.shm.OUTPUTS_MIN` bytes written into
    their segments from the arrays' memory. None when the request asks for no
    segments, or names its outputs (some may then be dropped and the rest
    renumbered: :func:`place_outputs` places those). Raises InvalidArgument
    for a malformed segment prefix."""
    if request.outputs or shm.OUTPUTS not in request.parameters:
        return None
    prefix, minimum = _output_prefix(request)

    def divert(index: int, tensor: Any, array: Any) -> bool:
        if array.nbytes < minimum:
            return False
        return _to_segment(prefix, index, array, tensor.name, tensor.parameters)

    return divert


def place_outputs(request: ModelInferRequest, response: ModelInferResponse) -> None:
    """Move outputs into shared memory where the request says so, in place:
    their bytes leave ``raw_output_contents`` (the entry stays, empty) and
    their parameters say where they are.

    Raises InvalidArgument when an output does not fit the region the client
    gave it (Triton's rule: the region must hold the whole output).
    """
    if not request.outputs and shm.OUTPUTS not in request.parameters:
        return  # the common case, checked without building the tables below
    regions = {
        out.name: (ref, out.parameters[shm.REGION].string_param)
        for out in request.outputs
        if (ref := shm.Ref.of(out.parameters)) is not None
    }
    prefix, minimum = _output_prefix(request)
    if not regions and not prefix:
        return
    use_raw_outputs(response)
    raw = response.raw_output_contents
    for index, out in enumerate(response.outputs):
        data = raw[index]  # a copy each time an entry is read: read once
        if out.name in regions:
            ref, region = regions[out.name]
            if len(data) > ref.size:
                raise InvalidArgument(
                    f"shared memory size specified with the request for output"
                    f" {out.name!r} ({ref.size} bytes) should be at least"
                    f" {len(data)} bytes to hold the results"
                )
            size = ref.write(data, f"output {out.name!r}")
            raw[index] = b""
            out.parameters[shm.REGION].string_param = region
            out.parameters[shm.REGION_SIZE].int64_param = size
        elif (
            prefix
            and len(data) >= minimum
            and _to_segment(prefix, index, data, out.name, out.parameters)
        ):
            raw[index] = b""
