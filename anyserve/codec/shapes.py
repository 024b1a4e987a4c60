"""Giving decoded tensor data its shape: numpy arrays, nested lists, scalars.

:mod:`anyserve.codec.values` reads a tensor's elements as one flat, row-major
list (or, with numpy, one flat array); this module turns them into a value of
the tensor's shape:

* :func:`dims` resolves the shape a tensor declares against the elements it
  holds (an empty shape is a scalar when it holds one element, else 1-d; a
  ``-1`` dimension takes what the others leave);
* :func:`nest` splits a flat list into nested lists of those dimensions;
* :func:`numpy_or_none` is the one place that decides whether numeric tensors
  decode to numpy arrays (numpy importable) or to nested lists (not).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from anyserve.errors import InvalidArgument

__all__ = ["dims", "nest", "numpy_or_none", "require_numpy"]

_UNSET: Any = object()
_numpy: Any = _UNSET


def numpy_or_none() -> Any:
    """The numpy module when it can be imported, else None.

    numpy is imported on the first call (the first numeric tensor decoded),
    not when anyserve is imported. Numeric tensors decode to numpy arrays when
    this returns the module and to nested lists when it returns None; tests
    monkeypatch this function to decode as if numpy were not installed.
    """
    global _numpy
    if _numpy is _UNSET:
        try:
            import numpy
        except ImportError:
            _numpy = None
        else:
            _numpy = numpy
    return _numpy


def require_numpy(what: str) -> Any:
    """numpy, or ImportError saying that ``what`` needs it."""
    np = numpy_or_none()
    if np is None:
        raise ImportError(f"{what} needs numpy; install it with `pip install numpy`")
    return np


def dims(what: str, shape: Sequence[int], count: int) -> tuple[int, ...]:
    """The dimensions ``count`` elements take for a tensor declaring ``shape``.

    ``shape`` must already have passed
    :func:`~anyserve.codec.datatypes.check_shape`. An empty shape gives ``()``
    (a scalar) for one element and ``(count,)`` otherwise: proto3 cannot tell
    a scalar ``[]`` from a shape that was never set. One ``-1`` dimension
    takes the size the other dimensions leave; more than one cannot be
    resolved and raises InvalidArgument naming ``what``.
    """
    if not shape:
        return () if count == 1 else (count,)
    wildcards = sum(1 for d in shape if d == -1)
    if not wildcards:
        return tuple(shape)
    if wildcards > 1:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} has more than one -1 dimension,"
            f" so its {count} elements have no single shape"
        )
    known = math.prod(d for d in shape if d != -1)
    rest = count // known if known else 0
    return tuple(rest if d == -1 else d for d in shape)


def nest(flat: list[Any], shape: Sequence[int]) -> list[Any]:
    """Split a flat row-major list into nested lists of ``shape`` (at least 1-d;
    ``len(flat)`` must be the product of ``shape``)."""
    if len(shape) <= 1:
        return flat
    step = math.prod(shape[1:])
    inner = shape[1:]
    return [nest(flat[i * step : (i + 1) * step], inner) for i in range(shape[0])]
