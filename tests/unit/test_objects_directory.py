"""The object store's directory is created private and checked when it exists."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from anyserve.objects.directory import prepare_root


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_directory_is_private(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    root = tmp_path / "objects"
    assert prepare_root(root) is None
    assert mode(root) == 0o700


def test_under_a_group_shared_parent_it_is_shared_with_that_group_only(tmp_path: Path) -> None:
    shared = tmp_path / "mount"
    shared.mkdir()
    shared.chmod(0o2775)
    root = shared / "objects"
    assert prepare_root(root) is None
    assert mode(root) == 0o2770
    assert root.stat().st_gid == shared.stat().st_gid


def test_an_existing_world_writable_directory_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    root.mkdir()
    root.chmod(0o777)
    warning = prepare_root(root)
    assert warning is not None and "writable by every user" in warning
    root.chmod(0o750)
    assert prepare_root(root) is None
    assert mode(root) == 0o750  # an existing directory is used as it is


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "objects"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        prepare_root(blocker)
