"""Declared tensor signatures: what a capability takes and returns.

``@app.capability(type="classify", inputs=[Tensor("x", "FP32", [-1, 4])],
outputs=[Tensor("probs", "FP32", [-1, 3])])`` declares the tensors a handler
expects (``-1`` marks a variable dimension). Declared signatures are checked
before a request reaches the handler, listed in model metadata and Triton's
model config, and let the CLI type its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anyserve.codec.datatypes import DATATYPES
from anyserve.errors import HandlerError, InvalidArgument
from anyserve.proto import ModelInferRequest, ModelInferResponse

__all__ = [
    "TRITON_TYPES",
    "Tensor",
    "check_request",
    "check_response",
    "config_dims",
    "fit_shape",
    "select_outputs",
    "triton_type",
]


@dataclass(frozen=True)
class Tensor:
    """One declared input or output: its name, KServe datatype and shape.

    ``shape`` holds non-negative sizes and ``-1`` for dimensions of any size.
    Raises ValueError (at declaration time) for an empty name, an unknown
    datatype or a malformed shape.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __init__(self, name: str, datatype: str, shape: Sequence[int]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Tensor name must be a non-empty string, got {name!r}")
        if datatype not in DATATYPES:
            raise ValueError(
                f"Tensor {name!r}: unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}"
            )
        dims = tuple(shape)
        for dim in dims:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < -1:
                raise ValueError(
                    f"Tensor {name!r}: shape {list(dims)} must hold sizes >= 0 or -1 (any)"
                )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "datatype", datatype)
        object.__setattr__(self, "shape", dims)

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` fits this declaration."""
        return len(shape) == len(self.shape) and all(
            want in (-1, got) for want, got in zip(self.shape, shape, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (what KServe v2 model metadata lists)."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tensor:
        """The inverse of :meth:`to_dict`; raises ValueError when malformed."""
        return cls(str(data["name"]), str(data["datatype"]), [int(d) for d in data["shape"]])


def tensors(value: Sequence[Tensor] | None, what: str) -> tuple[Tensor, ...]:
    """Validate a decorator's ``inputs``/``outputs`` list; ValueError when it is
    not a list of Tensor with distinct names."""
    if value is None:
        return ()
    if isinstance(value, Tensor) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a list of anyserve.Tensor, got {value!r}")
    found = tuple(value)
    for item in found:
        if not isinstance(item, Tensor):
            raise ValueError(f"{what} must hold anyserve.Tensor values, got {item!r}")
    names = [t.name for t in found]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} repeats a tensor name: {names}")
    return found


def _describe(declared: Sequence[Tensor]) -> str:
    return ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in declared)


def check_request(declared: Sequence[Tensor], request: ModelInferRequest) -> None:
    """Check a request's inputs against declared ``inputs`` (nothing to check
    when none are declared).

    Raises InvalidArgument naming the input and what was expected: a missing
    or unknown input, a wrong datatype or a shape that does not fit.
    """
    if not declared:
        return
    given = {t.name: t for t in request.inputs}
    for want in declared:
        got = given.pop(want.name, None)
        if got is None:
            raise InvalidArgument(
                f"missing input {want.name!r} ({want.datatype}{list(want.shape)});"
                f" this capability takes: {_describe(declared)}"
            )
        if got.datatype != want.datatype:
            raise InvalidArgument(
                f"input {want.name!r} must be {want.datatype}, not {got.datatype}"
            )
        if not want.accepts_shape(got.shape):
            raise InvalidArgument(
                f"input {want.name!r} has shape {list(got.shape)}; expected {list(want.shape)}"
                " (-1: any size)"
            )
    if given:
        raise InvalidArgument(
            f"unknown input {sorted(given)[0]!r}; this capability takes: {_describe(declared)}"
        )


def check_response(declared: Sequence[Tensor], response: ModelInferResponse) -> None:
    """Check a handler's outputs against declared ``outputs``: every declared
    output present with its datatype and a fitting shape, no others. Raises
    HandlerError (the handler broke its own contract)."""
    if not declared:
        return
    given = {t.name: t for t in response.outputs}
    for want in declared:
        got = given.pop(want.name, None)
        if got is None:
            raise HandlerError(f"the handler did not return declared output {want.name!r}")
        if got.datatype != want.datatype or not want.accepts_shape(got.shape):
            raise HandlerError(
                f"output {want.name!r} is {got.datatype}{list(got.shape)}; declared"
                f" {want.datatype}{list(want.shape)}"
            )
    if given:
        raise HandlerError(f"the handler returned undeclared output {sorted(given)[0]!r}")


def select_outputs(request: ModelInferRequest, response: ModelInferResponse) -> None:
    """Keep only the outputs the request asked for (its ``outputs`` list), in
    place; a request that names none gets every output. Raises
    InvalidArgument for a requested output the response does not have."""
    if not request.outputs:
        return
    wanted = [o.name for o in request.outputs]
    index = {t.name: i for i, t in enumerate(response.outputs)}
    missing = [name for name in wanted if name not in index]
    if missing:
        raise InvalidArgument(
            f"requested output {missing[0]!r} does not exist; outputs: {sorted(index)}"
        )
    if len(wanted) == len(index):
        return
    keep = sorted({index[name] for name in wanted})
    tensors_kept = [response.outputs[i] for i in keep]
    raw = list(response.raw_output_contents)
    kept_raw = [raw[i] for i in keep] if raw else []
    copies = [type(t)() for t in tensors_kept]
    for copy, tensor in zip(copies, tensors_kept, strict=True):
        copy.CopyFrom(tensor)
    del response.outputs[:]
    response.outputs.extend(copies)
    del response.raw_output_contents[:]
    response.raw_output_contents.extend(kept_raw)


# --------------------------------------------------------------------------- Triton's model config

#: KServe datatype -> the name of Triton's ``DataType`` enum value (model config).
TRITON_TYPES: dict[str, str] = {
    **{datatype: f"TYPE_{datatype}" for datatype in DATATYPES if datatype != "BYTES"},
    "BYTES": "TYPE_STRING",
}


def triton_type(datatype: str) -> str:
    """``"FP32"`` -> ``"TYPE_FP32"`` (``"BYTES"`` -> ``"TYPE_STRING"``); ValueError
    for an unknown datatype."""
    try:
        return TRITON_TYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}") from None


def config_dims(tensor: Tensor, max_batch_size: int) -> list[int]:
    """The dims Triton's model config lists for a declared tensor: with
    ``max_batch_size`` > 0 the first (batch) dimension is left out, as Triton
    does; otherwise the whole declared shape."""
    return list(tensor.shape[1:] if max_batch_size > 0 else tensor.shape)


def fit_shape(shape: Sequence[int], count: int) -> list[int]:
    """A concrete shape of ``count`` elements for a declared ``shape`` (``-1``:
    any size): the last ``-1`` takes what the fixed sizes leave, earlier ones
    are 1. ``fit_shape([-1, 4], 4) == [1, 4]``; ``fit_shape([], 1) == []``.

    Raises ValueError when ``count`` elements cannot take that shape.
    """
    fixed = 1
    for dim in shape:
        if dim != -1:
            fixed *= dim
    free = [i for i, dim in enumerate(shape) if dim == -1]
    result = list(shape)
    for i in free[:-1]:
        result[i] = 1
    if free:
        if (count % fixed if fixed else count) != 0:
            raise ValueError(f"{count} values do not fit shape {list(shape)}")
        result[free[-1]] = count // fixed if fixed else 0
    elif fixed != count:
        raise ValueError(f"shape {list(shape)} holds {fixed} values, not {count}")
    return result
