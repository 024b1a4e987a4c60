"""KServe v2 tensors <-> plain Python values.

Runs inside worker processes on every request, so everything here is table
driven and set up once at import; numpy is only imported when a value already
is a numpy array or when a numeric tensor is decoded (the first time).

Reading (``decode_*``): tensors come either in typed ``contents`` or, when the
message carries ``raw_input_contents``/``raw_output_contents``, in Triton's
raw layout (:mod:`anyserve.codec.datatypes`). Each tensor decodes to a value
of its shape (:mod:`anyserve.codec.shapes`):

* numeric datatypes (BOOL, UINT8..UINT64, INT8..INT64, FP16, FP32, FP64):
  with numpy installed, an array of the tensor's shape and its datatype's
  dtype (``bool``, ``uint8`` ... ``int64``, ``float16``, ``float32``,
  ``float64``), 0-d for shape ``[]``; from raw contents it is a read-only
  view of the message's bytes, not a copy. Without numpy, nested lists of
  that shape (``[1]`` -> ``[x]``, ``[2, 2]`` -> ``[[a, b], [c, d]]``) and
  a plain ``int``/``float``/``bool`` for shape ``[]``;
* BYTES: ``bytes`` when the tensor is one element of shape ``[1]`` or ``[]``,
  else nested lists of ``bytes`` of its shape (``[2]`` -> ``[b"a", b"b"]``,
  ``[2, 1]`` -> ``[[b"a"], [b"b"]]``).

An empty shape holding several elements is read as 1-d (proto3 cannot tell
``[]`` from a shape never set). BF16 is refused. Every malformed tensor
raises :class:`~anyserve.errors.InvalidArgument` naming the input or output.

Writing (``encode_*``, re-exported from :mod:`anyserve.codec.encoding`): a
Python value becomes a typed tensor. The tensor being filled says what it is,
so errors name an ``input`` or an ``output``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeAlias

from anyserve.codec import shapes
from anyserve.codec.datatypes import check_shape, spec, unpack_raw
from anyserve.codec.encoding import encode_input, encode_into, encode_output, is_numpy
from anyserve.codec.shapes import dims, nest
from anyserve.errors import InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = [
    "Inputs",
    "MissingInput",
    "MissingOutput",
    "Outputs",
    "attached_inputs",
    "decode_array",
    "decode_input",
    "decode_inputs",
    "decode_outputs",
    "encode_input",
    "encode_into",
    "encode_output",
    "input_text",
    "is_numpy",
]

InputTensor = ModelInferRequest.InferInputTensor
OutputTensor = ModelInferResponse.InferOutputTensor
Tensor: TypeAlias = InputTensor | OutputTensor


def _what(tensor: Tensor, name: str) -> str:
    return f"{'input' if isinstance(tensor, InputTensor) else 'output'} {name!r}"


# --------------------------------------------------------------------------- decoding


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


class MissingInput(InvalidArgument, KeyError):
    """A request has no input of the name asked for: InvalidArgument (400 to
    the caller when a handler lets it through), and still a KeyError."""

    def __str__(self) -> str:
        return self.message


class MissingOutput(KeyError):
    """A response has no output of the name asked for (a KeyError whose
    message names the outputs present)."""

    def __str__(self) -> str:
        return str(self.args[0])


class Inputs(dict[str, Any]):
    """What :func:`decode_inputs` returns: input name -> decoded value.

    Looking up a name that is not there (``inputs["x"]``) raises
    :class:`MissingInput` naming the inputs present; ``in`` and ``get`` work
    as on any dict.
    """

    def __missing__(self, name: str) -> Any:
        raise MissingInput(f"request has no input {name!r} (inputs present: {_names(list(self))})")


class Outputs(dict[str, Any]):
    """What :func:`decode_outputs` returns: output name -> decoded value.

    Looking up a name that is not there raises :class:`MissingOutput` naming
    the outputs present.
    """

    def __missing__(self, name: str) -> Any:
        raise MissingOutput(
            f"response has no output {name!r} (outputs present: {_names(list(self))})"
        )


# Raw bytes of requests whose inputs live elsewhere (shared memory), by the
# request object's id, for as long as the worker's call on it runs: a handler
# is given the protobuf request itself and decodes it whenever it likes.
_ATTACHED: dict[int, Sequence[Any]] = {}


@contextmanager
def attached_inputs(request: ModelInferRequest, raw: Sequence[Any] | None) -> Iterator[None]:
    """Within the block, decoding ``request`` reads input ``i``'s raw bytes
    from ``raw[i]`` (any buffer: a read-only shared-memory view stays a view)
    instead of ``raw_input_contents``. ``None``: nothing to attach."""
    if raw is None:
        yield
        return
    _ATTACHED[id(request)] = raw
    try:
        yield
    finally:
        del _ATTACHED[id(request)]


def _raw_entries(message: ModelInferRequest | ModelInferResponse) -> Sequence[Any]:
    if isinstance(message, ModelInferRequest):
        if _ATTACHED and (attached := _ATTACHED.get(id(message))) is not None:
            return attached
        raw, count, owner, kind = (
            message.raw_input_contents,
            len(message.inputs),
            "request",
            "input",
        )
    else:
        raw, count = message.raw_output_contents, len(message.outputs)
        owner, kind = "response", "output"
    if raw and len(raw) != count:
        raise InvalidArgument(
            f"{owner} has {len(raw)} raw_{kind}_contents entries for {count}"
            f" {kind}s; when raw_{kind}_contents is used every {kind} must be in it"
        )
    return raw


def _no_typed_contents(tensor: Tensor, what: str) -> None:
    if tensor.HasField("contents") and tensor.contents.ByteSize():
        owner, kind = ("request", "input") if what.startswith("input") else ("response", "output")
        raise InvalidArgument(f"{what} has typed contents but the {owner} uses raw_{kind}_contents")


def _values(tensor: Tensor, raw: Sequence[bytes], index: int) -> list[Any]:
    """The tensor's elements as one flat row-major list (shape checked)."""
    what = _what(tensor, tensor.name)
    field, _, _ = spec(tensor.datatype, what)
    if raw:
        _no_typed_contents(tensor, what)
        values = unpack_raw(tensor.datatype, raw[index], what)
    else:
        values = list(getattr(tensor.contents, field))
        if not values and tensor.contents.ByteSize():
            present = ", ".join(f.name for f, _ in tensor.contents.ListFields())
            raise InvalidArgument(
                f"{what} has datatype {tensor.datatype}, whose data belongs in {field},"
                f" but its data is in {present}"
            )
    check_shape(what, tensor.shape, len(values))
    return values


def _array(np: Any, tensor: Tensor, raw: Sequence[bytes], index: int) -> Any:
    """The tensor as a numpy array of its shape: its datatype's dtype (object
    holding ``bytes`` for BYTES); a read-only view of raw contents."""
    what = _what(tensor, tensor.name)
    _, code, size = spec(tensor.datatype, what)
    if raw and size:
        _no_typed_contents(tensor, what)
        if len(raw[index]) % size:
            unpack_raw(tensor.datatype, raw[index], what)  # raises with the precise message
        array = np.frombuffer(raw[index], dtype=np.dtype(code).newbyteorder("<"))
        check_shape(what, tensor.shape, array.size)
    else:
        values = _values(tensor, raw, index)
        if size:
            try:
                with np.errstate(over="ignore"):  # an FP16 beyond its range is inf
                    array = np.array(values, dtype=np.dtype(code))
            except (OverflowError, ValueError, TypeError) as exc:
                fit = f"{what}: data does not fit {tensor.datatype}: {exc}"
                raise InvalidArgument(fit) from None
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = values
    return array.reshape(dims(what, tensor.shape, array.size))


def _decode(tensor: Tensor, raw: Sequence[bytes], index: int) -> Any:
    """One tensor as a value of its shape (the rules of the module docstring)."""
    what = _what(tensor, tensor.name)
    numeric = spec(tensor.datatype, what)[2] > 0
    if numeric:
        np = shapes.numpy_or_none()  # looked up per call: the seam tests patch
        if np is not None:
            return _array(np, tensor, raw, index)
    values = _values(tensor, raw, index)
    shape = dims(what, tensor.shape, len(values))
    if len(values) == 1 and (not shape or (not numeric and shape == (1,))):
        return values[0]
    return nest(values, shape)


def decode_inputs(request: ModelInferRequest) -> Inputs:
    """Decode every input into a value of its shape, keyed by name.

    Numeric tensors become numpy arrays of their shape and dtype when numpy
    is installed (FP32 ``[1, 4]`` -> an array of shape ``(1, 4)``; ``[1]`` ->
    shape ``(1,)``; ``[]`` -> a 0-d array), else nested lists of that shape
    (``[]`` -> a plain ``int``/``float``/``bool``). A BYTES tensor holding one
    element of shape ``[1]`` or ``[]`` becomes ``bytes``; other BYTES tensors
    nested lists of ``bytes`` (``[2]`` -> ``[b"a", b"b"]``, ``[2, 1]`` ->
    ``[[b"a"], [b"b"]]``). Arrays decoded from raw contents are read-only.

    Looking up a name the request lacks (``inputs["x"]``) raises
    :class:`MissingInput`, an InvalidArgument (400) naming the inputs present.
    Raises InvalidArgument for unsupported datatypes, element counts that do
    not fill the shape, malformed raw data, a raw_input_contents count that
    differs from the inputs, or a repeated input name.
    """
    raw = _raw_entries(request)
    result = Inputs()
    for index, tensor in enumerate(request.inputs):
        if tensor.name in result:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        result[tensor.name] = _decode(tensor, raw, index)
    return result


def decode_outputs(response: ModelInferResponse) -> Outputs:
    """Decode every output of a response into a value of its shape, keyed by
    name, from typed contents or raw_output_contents (the rules of
    :func:`decode_inputs`: a handler's ``{"n": 8}`` reads back as an INT64
    ``[1]`` array, ``[8]``; its ``"text"`` as ``b"text"``).

    Looking up a name the response lacks raises :class:`MissingOutput` (a
    KeyError) naming the outputs present. Raises InvalidArgument for
    malformed outputs or a raw_output_contents count that differs from the
    outputs.
    """
    raw = _raw_entries(response)
    result = Outputs()
    for index, tensor in enumerate(response.outputs):
        result[tensor.name] = _decode(tensor, raw, index)
    return result


def _find(request: ModelInferRequest, name: str) -> tuple[int, InputTensor]:
    for index, tensor in enumerate(request.inputs):
        if tensor.name == name:
            return index, tensor
    present = _names([t.name for t in request.inputs])
    raise MissingInput(f"request has no input {name!r} (inputs present: {present})")


def decode_input(request: ModelInferRequest, name: str) -> Any:
    """Decode the input called ``name`` into a value of its shape (the rules
    of :func:`decode_inputs`).

    Raises :class:`MissingInput` (InvalidArgument) when the input is missing,
    listing those present, and InvalidArgument when it is malformed.
    """
    index, tensor = _find(request, name)
    return _decode(tensor, _raw_entries(request), index)


def input_text(request: ModelInferRequest, name: str) -> str:
    """Return a one-element BYTES input decoded as UTF-8.

    Raises InvalidArgument when the input is missing, not BYTES, does not hold
    exactly one element, or is not valid UTF-8.
    """
    index, tensor = _find(request, name)
    what = f"input {name!r}"
    if tensor.datatype != "BYTES":
        raise InvalidArgument(f"{what} must be BYTES to be read as text, not {tensor.datatype}")
    values = _values(tensor, _raw_entries(request), index)
    if len(values) != 1:
        raise InvalidArgument(f"{what} must hold exactly one element, it has {len(values)}")
    try:
        text: str = values[0].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{what} is not valid UTF-8: {exc}") from None
    return text


def decode_array(request: ModelInferRequest, name: str) -> Any:
    """Decode the input called ``name`` into a numpy array of its shape and
    dtype, whatever its datatype (the explicit form of :func:`decode_input`).

    BYTES inputs become object arrays of ``bytes`` (a one-element BYTES input
    too, of shape ``(1,)``). Arrays decoded from raw data are read-only views
    of the request's bytes (as in tritonclient); copy them to modify. An empty
    shape gives a 0-d array for one element, else 1-d. Raises ImportError
    without numpy, InvalidArgument for a missing or malformed input.
    """
    np = shapes.require_numpy("decode_array")
    index, tensor = _find(request, name)
    return _array(np, tensor, _raw_entries(request), index)
