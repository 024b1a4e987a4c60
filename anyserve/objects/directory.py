"""The store's directory: created with safe permissions, checked when it exists."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def prepare_root(path: str | os.PathLike[str]) -> str | None:
    """Create the store directory if needed and say what is unsafe about it.

    A new directory is private (0700), or, when its parent is group-writable
    (a mount shared by a group of service users), shared with that group only
    (02770, the parent's group). Returns a warning for an existing directory
    that every user may write to (anyone on the machine could plant or replace
    objects), else None. Raises OSError when it cannot be created.
    """
    root = Path(path)
    if not root.exists():
        parent = root.parent.resolve()
        shared = parent.is_dir() and bool(parent.stat().st_mode & stat.S_IWGRP)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if shared:
            os.chown(root, -1, parent.stat().st_gid)
            root.chmod(0o2770)
    mode = root.stat().st_mode
    if not stat.S_ISDIR(mode):
        raise NotADirectoryError(f"{root} is not a directory")
    if mode & stat.S_IWOTH:
        return (
            f"object store directory {root} is writable by every user: anyone on this"
            f" machine can plant or replace objects (chmod o-w {root})"
        )
    return None
