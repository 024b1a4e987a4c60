"""The options of ``@app.capability``, checked when a handler is declared.

A mistake in a decorator fails at import, with a message naming the key and
the value, instead of registering a routing key nobody sends
(``steam=True``) or failing later in the replica (``workers="2"``):

* capability values (:func:`check_capability`) are strings, or ints that
  match as their decimal string (``gpus=2`` matches ``X-Capability-Gpus: 2``).
  ``bool``, ``None``, floats and other objects are refused, and so are
  strings a header could never match: empty, padded with spaces, holding a
  comma (the ``type=chat,model=x`` form splits on it) or a control character;
* a capability key within a typo of an option name (:func:`close_option`)
  is refused with "did you mean ``stream``?" (``steam=True``, ``worker=2``,
  ``max_batchsize=8``), unless its value is a string and the option takes
  none: ``input="image"`` is a capability key, not a mistyped ``inputs``;
* each option's value (:func:`check_options`) has its type and range.

:class:`~anyserve.capability.Capability` itself stays lenient (booleans
become ``"true"``), as registration JSON and clients rely on it; only the
decorator holds user code to these rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from anyserve.capability import Capability, normalise_key
from anyserve.signature import Tensor, tensors

__all__ = ["OPTIONS", "Options", "check_capability", "check_options", "close_option"]

#: Every keyword option of ``@app.capability``; any other keyword is a capability key.
OPTIONS = (
    "stream",
    "workers",
    "max_concurrency",
    "resources",
    "preload",
    "name",
    "max_batch_size",
    "batch_timeout",
    "inputs",
    "outputs",
    "start_timeout",
    "max_queue",
    "max_memory_mib",
    "zero_copy",
)
# The one option that takes a string: a string-valued key close to another
# option is taken as the capability key it looks like (``input="image"``).
_STRING_OPTIONS = frozenset({"name"})
#: Calls one worker holds waiting beyond those it runs, when max_queue is not given.
DEFAULT_MAX_QUEUE = 1024
# batch_timeout's upper bound, in seconds.
MAX_BATCH_TIMEOUT = 60.0


def _distance(a: str, b: str) -> int:
    """Edit distance: insertions, deletions, substitutions and swaps of two
    adjacent letters each count 1 (``steam`` -> ``stream`` is 1)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def close_option(key: str) -> str | None:
    """The option name ``key`` is a typo of, or None.

    ``key`` is compared once normalised as capability keys are (``Max-Batch-Size``
    is ``max_batch_size``). Close means within 2 edits of an option of six
    letters or more, within 1 of ``name``: ``steam``, ``worker``,
    ``max_batchsize`` are caught while ordinary capability keys (``type``,
    ``model``, ``task``, ``lang``, ``node``) are not.
    """
    norm = key.strip().lower().replace("-", "_")
    best: tuple[int, str] | None = None
    for option in OPTIONS:
        distance = _distance(norm, option)
        if distance <= (2 if len(option) >= 6 else 1) and (best is None or distance < best[0]):
            best = (distance, option)
    return None if best is None else best[1]


def _check_value(key: str, value: Any) -> None:
    where = f"@app.capability({key}={value!r})"
    if isinstance(value, bool):
        raise ValueError(
            f"{where}: a capability value is a str or an int, not a bool"
            f" (for the text, write {key}={str(value).lower()!r})"
        )
    if not isinstance(value, str | int):
        raise ValueError(
            f"{where}: a capability value is a str or an int, not {type(value).__name__}"
        )
    if isinstance(value, int):
        return
    if not value:
        raise ValueError(f"{where}: a capability value cannot be empty")
    if value != value.strip():
        raise ValueError(f"{where}: surrounding spaces never match a header (headers are trimmed)")
    if "," in value:
        raise ValueError(
            f"{where}: a capability value cannot hold ',' (it separates key=value pairs)"
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise ValueError(f"{where}: a capability value cannot hold control characters")


def check_capability(capability: Mapping[str, Any]) -> Capability:
    """The :class:`Capability` of a decorator's keyword arguments (all but the
    options); ValueError for no keys, an empty key, a key that looks like a
    mistyped option (see the module docstring), two keys that are one once
    normalised (``Model`` and ``model``) or a value that is not a str or int
    a header can match."""
    if not capability:
        raise ValueError("@app.capability needs at least one key, e.g. type='chat'")
    seen: dict[str, str] = {}
    for key, value in capability.items():
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"@app.capability: a capability key is a non-empty str, got {key!r}")
        option = close_option(key)
        # A string value cannot be meant for an option that takes none (`input="image"`
        # is a capability), unless the key is the option itself, spelt differently.
        exempt = isinstance(value, str) and option not in _STRING_OPTIONS
        if option and (not exempt or normalise_key(key) == option):
            raise ValueError(
                f"@app.capability({key}={value!r}): did you mean `{option}`? `{key}` is not an"
                f" option, and a capability key this close to `{option}` is taken for a typo"
            )
        _check_value(key, value)
        norm = normalise_key(key)
        if norm in seen:
            raise ValueError(
                f"@app.capability: keys {seen[norm]!r} and {key!r} are the same capability key"
                f" {norm!r} (keys ignore case and treat '-' as '_')"
            )
        seen[norm] = key
    return Capability(capability)


@dataclass(frozen=True)
class Options:
    """The checked options of one ``@app.capability``."""

    stream: bool
    workers: int
    max_concurrency: int | None
    resources: dict[str, float]
    preload: bool
    name: str | None
    max_batch_size: int
    batch_timeout: float
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    start_timeout: float | None
    max_queue: int
    max_memory_mib: float | None = None
    zero_copy: bool = False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _resources(value: Any) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad("resources", value, "a mapping of resource name -> amount, e.g. {'gpu': 1}")
    found: dict[str, float] = {}
    for key, amount in value.items():
        if not isinstance(key, str) or not key.strip():
            raise _bad("a resources name", key, "a non-empty str")
        if not _is_number(amount) or amount < 0:
            raise _bad(f"resources[{key!r}]", amount, "a number >= 0")
        found[key] = float(amount)
    return found


def _bad(option: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"@app.capability: {option} must be {expected}, got {value!r}")


def check_options(
    *,
    stream: Any,
    workers: Any,
    max_concurrency: Any,
    resources: Any,
    preload: Any,
    name: Any,
    max_batch_size: Any,
    batch_timeout: Any,
    inputs: Any,
    outputs: Any,
    start_timeout: Any,
    max_queue: Any,
    max_memory_mib: Any = None,
    zero_copy: Any = False,
) -> Options:
    """Check every option of ``@app.capability``; ValueError naming the
    option, what it takes and the value given."""
    if not isinstance(stream, bool):
        raise _bad("stream", stream, "True or False")
    if not _is_int(workers) or workers < 0:
        raise _bad("workers", workers, "an int >= 0 (0: none at boot)")
    if max_concurrency is not None and (not _is_int(max_concurrency) or max_concurrency < 1):
        raise _bad("max_concurrency", max_concurrency, "an int >= 1, or None for the default")
    if not isinstance(preload, bool):
        raise _bad("preload", preload, "True or False")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise _bad("name", name, "a non-empty str")
    if not _is_int(max_batch_size) or max_batch_size < 0:
        raise _bad("max_batch_size", max_batch_size, "an int >= 0 (0: no batching)")
    if max_batch_size and stream:
        raise ValueError("@app.capability: streaming handlers are not batched; drop max_batch_size")
    if not _is_number(batch_timeout) or not 0 <= batch_timeout <= MAX_BATCH_TIMEOUT:
        raise _bad("batch_timeout", batch_timeout, "seconds between 0 and 60")
    if start_timeout is not None and (not _is_number(start_timeout) or start_timeout <= 0):
        raise _bad("start_timeout", start_timeout, "seconds > 0, or None for the replica's default")
    if not _is_int(max_queue) or max_queue < 0:
        raise _bad("max_queue", max_queue, "an int >= 0 (calls waiting per worker)")
    if max_memory_mib is not None and (not _is_number(max_memory_mib) or max_memory_mib <= 0):
        raise _bad("max_memory_mib", max_memory_mib, "MiB > 0, or None for the replica's default")
    if not isinstance(zero_copy, bool):
        raise _bad("zero_copy", zero_copy, "True or False")
    try:
        declared_inputs, declared_outputs = tensors(inputs, "inputs"), tensors(outputs, "outputs")
    except ValueError as exc:
        raise ValueError(f"@app.capability: {exc}") from None
    return Options(
        stream=stream,
        workers=workers,
        max_concurrency=max_concurrency,
        resources=_resources(resources),
        preload=preload,
        name=name,
        max_batch_size=max_batch_size,
        batch_timeout=float(batch_timeout),
        inputs=declared_inputs,
        outputs=declared_outputs,
        start_timeout=None if start_timeout is None else float(start_timeout),
        max_queue=max_queue,
        max_memory_mib=None if max_memory_mib is None else float(max_memory_mib),
        zero_copy=zero_copy,
    )
