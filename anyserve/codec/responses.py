"""Handler results -> ``ModelInferResponse`` / ``ModelStreamInferResponse``.

A handler returns (or yields) a KServe message, ``str``/``bytes`` (the
``text_output`` output) or a dict of output name -> value; this module builds
the response the worker sends back.

**numpy outputs go out raw.** When a dict result holds a numeric numpy array
(or numpy scalar), the response carries *every* output in
``raw_output_contents`` (Triton's rule: one entry per output once it is used):
the array's data is taken straight from its buffer as little-endian bytes,
with no per-element Python work, and the other outputs are packed with
:func:`~anyserve.codec.datatypes.pack_raw`. Results without numeric numpy
arrays keep typed ``contents``; string and object numpy arrays are BYTES and
do not make a response raw. Every reader takes both forms:
:func:`~anyserve.codec.decode_outputs`, the JSON, binary and generate
renderers, and tritonclient. :func:`use_raw_outputs` makes a whole response
raw on demand (for clients, such as tritonclient, that sent raw inputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from anyserve.codec.datatypes import numpy_datatype, pack_raw, spec
from anyserve.codec.values import encode_into, is_numpy
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse, ModelStreamInferResponse

__all__ = ["to_infer_response", "to_stream_response", "use_raw_outputs"]

OutputTensor = ModelInferResponse.InferOutputTensor
#: ``(index, tensor, array)`` -> whether the array's bytes went elsewhere: see
#: :func:`to_infer_response`.
Divert = Callable[[int, OutputTensor, Any], bool]


def _numpy_raw(
    tensor: OutputTensor, name: str, array: Any, index: int, divert: Divert | None
) -> bytes | None:
    """Describe a numeric numpy array in ``tensor`` and return its raw bytes
    (empty when ``divert`` took them); None (tensor untouched) for a BYTES
    array."""
    datatype = numpy_datatype(array.dtype, f"output {name!r}")
    if datatype == "BYTES":
        return None
    tensor.name = name
    tensor.datatype = datatype
    tensor.shape.extend(list(array.shape) if array.ndim else [1])
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    if divert is not None and little.flags.c_contiguous and divert(index, tensor, little):
        return b""
    data: bytes = little.tobytes()
    return data


def _move_to_raw(response: ModelInferResponse, ready: dict[int, bytes]) -> None:
    """Put every output in raw_output_contents: ``ready[index]`` when given,
    else its typed contents packed. Raises ValueError (response untouched)
    when typed contents do not fit their datatype."""
    blobs: list[bytes] = []
    for index, tensor in enumerate(response.outputs):
        blob = ready.get(index)
        if blob is None:
            what = f"output {tensor.name!r}"
            try:
                field, _, _ = spec(tensor.datatype, what)
                blob = pack_raw(tensor.datatype, getattr(tensor.contents, field), what)
            except InvalidArgument as exc:
                raise ValueError(exc.message) from None
        blobs.append(blob)
    for tensor in response.outputs:
        tensor.ClearField("contents")
    response.raw_output_contents.extend(blobs)


def _stamp(response: ModelInferResponse, request: ModelInferRequest) -> None:
    if not response.id:
        response.id = request.id
    if not response.model_name:
        response.model_name = request.model_name


def _build_dict(
    response: ModelInferResponse, result: dict[Any, Any], divert: Divert | None
) -> None:
    raw: dict[int, bytes] = {}
    for key, value in result.items():
        if not isinstance(key, str):
            raise TypeError(f"output names must be str, got {type(key).__name__} {key!r}")
        tensor = response.outputs.add()
        if isinstance(value, OutputTensor):
            tensor.CopyFrom(value)
            if not tensor.name:
                tensor.name = key
            continue
        index = len(response.outputs) - 1
        blob = _numpy_raw(tensor, key, value, index, divert) if is_numpy(value) else None
        if blob is None:
            encode_into(tensor, key, value)
        else:
            raw[index] = blob
    if raw:
        _move_to_raw(response, raw)


def _build(response: ModelInferResponse, result: Any, divert: Divert | None = None) -> None:
    if isinstance(result, str | bytes):
        encode_into(response.outputs.add(), "text_output", result)
    elif isinstance(result, dict):
        _build_dict(response, result, divert)
    elif isinstance(result, OutputTensor):
        response.outputs.add().CopyFrom(result)
    elif result is None:
        raise TypeError("handler returned None; return a response, str, bytes or dict")
    else:
        raise TypeError(
            f"handler returned {type(result).__qualname__}; expected ModelInferResponse,"
            " str, bytes or a dict of output name -> value"
        )


def to_infer_response(
    result: Any, request: ModelInferRequest, *, divert: Divert | None = None
) -> ModelInferResponse:
    """Turn a handler's result into a ModelInferResponse.

    A ModelInferResponse is returned itself (not copied); str/bytes becomes
    output ``text_output``; a dict becomes one output per item (values through
    :func:`~anyserve.codec.encode_output`, InferOutputTensor values as they
    are), all of them raw when one is a numeric numpy array (see the module
    docstring). ``id`` and ``model_name`` are filled from the request when
    empty. Raises TypeError for None and unsupported results, ValueError for
    values that do not fit their datatype.

    ``divert`` is offered each numeric, C-contiguous numpy array of a dict
    result, little-endian, with its output's index and its described tensor,
    before the array's bytes are copied: when it returns True it has put
    them elsewhere (and said where in the tensor), and the output's
    ``raw_output_contents`` entry stays empty. The worker uses it to write a
    big output straight into shared memory (:mod:`anyserve.shm_tensors`).
    """
    if isinstance(result, ModelInferResponse):
        response = result
    else:
        response = ModelInferResponse()
        _build(response, result, divert)
    _stamp(response, request)
    return response


def to_stream_response(chunk: Any, request: ModelInferRequest) -> ModelStreamInferResponse:
    """Turn one streamed chunk into a ModelStreamInferResponse.

    A ModelStreamInferResponse is returned itself, with its infer_response's
    ``id``/``model_name`` filled when it has one; anything else is converted as
    by :func:`to_infer_response` and wrapped.
    """
    if isinstance(chunk, ModelStreamInferResponse):
        if chunk.HasField("infer_response"):
            _stamp(chunk.infer_response, request)
        return chunk
    stream = ModelStreamInferResponse()
    if isinstance(chunk, ModelInferResponse):
        stream.infer_response.CopyFrom(chunk)
    else:
        _build(stream.infer_response, chunk)
    _stamp(stream.infer_response, request)
    return stream


def use_raw_outputs(response: ModelInferResponse) -> None:
    """Move every output's typed contents into ``raw_output_contents``, in place.

    Entries follow the output order, in Triton's raw layout; ``contents`` is
    cleared. A response that already has raw_output_contents is left alone.
    Raises ValueError (and leaves the response untouched) when an output has an
    unknown datatype or values that do not fit it.
    """
    if not response.raw_output_contents:
        _move_to_raw(response, {})
