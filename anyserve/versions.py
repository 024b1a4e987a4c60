"""Model versions (Triton's): ordering, choosing the latest, and Triton's
wording for a model or version nobody serves.

A handler serves one version of its capability's name (``HandlerInfo.version``,
the capability's ``version`` key, default ``"1"``). A request naming no version
gets the latest: versions that are decimal numbers compare as numbers and
come after any other text (compared as text).
"""

from __future__ import annotations

from collections.abc import Iterable


def order(version: str) -> tuple[int, int, str]:
    """Sort key of a version: numbers by value, after non-numeric ones."""
    if version.isdecimal():
        return (1, int(version), "")
    return (0, 0, version)


def latest(versions: Iterable[str]) -> str:
    """The latest of ``versions`` (see the module docstring); "" when empty."""
    return max(versions, key=order, default="")


def sorted_versions(versions: Iterable[str]) -> list[str]:
    """Distinct versions, oldest first."""
    return sorted(set(versions), key=order)


def unknown_model(name: str, version: str = "", detail: str = "") -> str:
    """Triton's message for an unknown model (or version of it), which tooling
    built on tritonclient matches, followed by anyserve's own ``detail``."""
    which = f"'{name}' version {version}" if version else f"'{name}'"
    message = f"Request for unknown model: {which} is not found"
    if version and not version.isdecimal():
        # Triton's versions are numbers; it words a non-numeric one this way.
        message += f" (failed to get model version from specified version string '{version}')"
    return f"{message}: {detail}" if detail else message
