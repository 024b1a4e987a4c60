"""Object references: ``ObjRef``, what a reference may look like, and new ids.

A reference is opaque: ``obj-`` followed by 32 lowercase hex digits (128 random bits).
It travels as a string (``str(ref)``, and as a BYTES tensor element through
``__anyserve_wire__``). References arrive from the network, so a store accepts only that
exact form, or the full path form ``<root>/obj-<hex>.bin`` when ``<root>`` is the store's
root written the same way (as configured or fully resolved). Everything else -- other
directories, ``..``, percent-encoded traversal, NUL bytes, uppercase hex, empty or
over-long values -- is ``InvalidArgument``. Uppercase hex is rejected rather than folded,
because file names are case-sensitive and a reference has exactly one spelling.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from anyserve.errors import InvalidArgument

__all__ = ["ObjRef", "RefLike"]

_ID_RE = re.compile(r"obj-[0-9a-f]{32}")
_OBJ_FILE_RE = re.compile(r"obj-[0-9a-f]{32}\.bin")
_MAX_REF_LEN = 255


@dataclass(frozen=True, slots=True)
class ObjRef:
    """An immutable reference to one object: ``id`` plus where it lives in a store.

    ``str(ref)`` and ``ref.__anyserve_wire__()`` are the id; equality and hashing use the
    id only (the same object seen through two mounts of a shared store is one reference).
    ``path`` is ``<store root>/<id>.bin`` of the store that produced the reference; stores
    never trust it and always re-derive the path from the id.

    Raises ``InvalidArgument`` when ``id`` is not ``obj-`` + 32 lowercase hex digits or
    ``path`` is not named ``<id>.bin``.
    """

    id: str
    path: Path = field(compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise InvalidArgument(f"invalid object id {_show(self.id)}")
        if self.path.name != f"{self.id}.bin":
            raise InvalidArgument(f"object path {str(self.path)!r} does not match {self.id}")

    def __str__(self) -> str:
        return self.id

    def __anyserve_wire__(self) -> str:
        """The id, as it travels in a BYTES tensor element."""
        return self.id


#: What a reference argument may be: an ``ObjRef``, or its id (or full path) as text/bytes.
RefLike: TypeAlias = ObjRef | str | bytes | bytearray | memoryview


def _show(value: object, limit: int = 64) -> str:
    """A short, printable rendering of an untrusted value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _new_id() -> str:
    """A fresh object id: ``obj-`` + 32 lowercase hex digits from 128 random bits."""
    return "obj-" + secrets.token_hex(16)


def _max_ref_len(root_forms: Set[str]) -> int:
    """The longest reference (characters, or bytes) accepted for a root spelled so."""
    return max(_MAX_REF_LEN, max(map(len, root_forms)) + 64)


def _parse_ref(value: RefLike, root: Path, root_forms: Set[str], max_len: int) -> ObjRef:
    """Validate an untrusted reference against a store's root; return its ``ObjRef``.

    Accepts an ``ObjRef`` (its id is re-checked and its path re-derived under ``root``),
    or a ``str``/``bytes`` of at most ``max_len`` characters holding exactly the id form or
    the full path form ``<root>/obj-<hex>.bin`` with ``<root>`` one of ``root_forms``.
    Pure string checks: touches no file. Raises ``InvalidArgument`` (naming the value,
    truncated) for anything else.
    """
    if isinstance(value, ObjRef):
        return _ref_under(root, value.id)
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) > max_len:
            raise InvalidArgument(f"object reference too long ({len(value)} bytes)")
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidArgument(f"invalid object reference {_show(bytes(value))}") from None
    elif isinstance(value, str):
        text = value
    else:
        raise InvalidArgument(
            f"an object reference must be an ObjRef, str or bytes, not {type(value).__name__}"
        )
    if not text:
        raise InvalidArgument("empty object reference")
    if len(text) > max_len:
        raise InvalidArgument(f"object reference too long ({len(text)} characters)")
    if _ID_RE.fullmatch(text):
        return _ref_under(root, text)
    if text.startswith("/") and "\x00" not in text:
        head, _, name = text.rpartition("/")
        if head in root_forms and _OBJ_FILE_RE.fullmatch(name):
            return _ref_under(root, name[: -len(".bin")])
    raise InvalidArgument(
        f"invalid object reference {_show(text)}: expected 'obj-' and 32 lowercase hex "
        f"digits, or a path inside {str(root)!r}"
    )


def _ref_under(root: Path, oid: str) -> ObjRef:
    """The reference to object ``oid`` of the store rooted at ``root``."""
    return ObjRef(oid, root / f"{oid}.bin")
