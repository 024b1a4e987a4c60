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

__all__ = ["Tensor"]


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
