"""The object store's TTL sweeper: one directory scan that removes and measures.

A pass removes expired objects and orphaned temporary files (see
``anyserve.objects.store`` for the rules) and, since it looks at every file anyway,
counts what stays: the objects left and their bytes. The replica runs
:func:`run_sweeper` and exports each :class:`SweepReport` on its ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from anyserve.objects.ref import _OBJ_FILE_RE

logger = logging.getLogger("anyserve.objects")

TMP_PREFIX = ".tmp-"
TMP_FILE_RE = re.compile(r"\.tmp-obj-[0-9a-f]{32}-[0-9a-f]{8}")


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep pass did and found.

    ``expired``: object files removed (older than the TTL); ``orphans``: temporary files
    removed (older than the grace); ``objects``/``bytes``: the object files left in the
    directory and their total size (temporary files are not counted).
    """

    expired: int = 0
    orphans: int = 0
    objects: int = 0
    bytes: int = 0

    @property
    def removed(self) -> int:
        """Files removed: expired objects plus orphaned temporary files."""
        return self.expired + self.orphans


def sweep_directory(root: Path, ttl: float, tmp_grace: float, now: float) -> SweepReport:
    """Scan ``root`` once (blocking): remove an object file once ``now - mtime > ttl``
    and a temporary file once ``now - mtime > tmp_grace``, and measure the objects left.

    Only regular files whose names match the store's patterns are considered: symlinks
    and foreign files are left alone and not counted. Files removed concurrently (by
    another replica's sweeper) are skipped. A missing ``root`` is an empty store.
    """
    expired = orphans = objects = size = 0
    try:
        entries = os.scandir(root)
    except FileNotFoundError:
        return SweepReport()
    with entries:
        for entry in entries:
            is_object = _OBJ_FILE_RE.fullmatch(entry.name) is not None
            if not is_object and not TMP_FILE_RE.fullmatch(entry.name):
                continue
            max_age = ttl if is_object else tmp_grace
            try:
                st = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if now - st.st_mtime <= max_age:
                    if is_object:
                        objects += 1
                        size += st.st_size
                    continue
                os.unlink(root / entry.name)
            except FileNotFoundError:
                continue
            if is_object:
                expired += 1
            else:
                orphans += 1
    return SweepReport(expired, orphans, objects, size)


async def run_sweeper(
    sweep: Callable[[], Awaitable[SweepReport]],
    interval: float,
    on_sweep: Callable[[SweepReport], None] | None = None,
    where: object = "",
) -> None:
    """Call ``sweep`` (an async function returning a :class:`SweepReport`) now and then
    every ``interval`` seconds, forever, handing each report to ``on_sweep``
    (``where``: the store's directory, for the log).

    A failing sweep is logged and retried next time; cancellation propagates (run it in
    a task group and cancel the group to stop it). ``ValueError`` unless ``interval > 0``.
    """
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    while True:
        try:
            report = await sweep()
            if on_sweep is not None:
                on_sweep(report)
        except Exception:
            logger.exception("sweeping the object store %s failed", where)
        await anyio.sleep(interval)
