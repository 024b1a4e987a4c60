"""RegionTable: the checks of a system shared memory registration, on real
segments in /dev/shm (unique names, removed afterwards)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from anyserve.api_server.shm_regions import (
    MAX_NAME,
    NEED_NAME,
    SHM_DIR,
    Region,
    RegionExists,
    RegionTable,
)
from anyserve.errors import InvalidArgument, NotFound, Overloaded

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR}")

Segment = Callable[[int], str]


@pytest.fixture
def made() -> Iterator[list[Path]]:
    """Every file this test creates in /dev/shm; all gone afterwards."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    left = [str(p) for p in paths if os.path.lexists(p)]
    assert not left, f"left behind: {left}"


def unique() -> str:
    return f"anyserve-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def segment(made: list[Path]) -> Segment:
    """``segment(size)``: a new segment of ``size`` bytes; returns its key."""

    def make(size: int) -> str:
        path = Path(SHM_DIR, unique())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        made.append(path)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return "/" + path.name

    return make


def test_register_status_resolve_unregister(segment: Segment) -> None:
    table = RegionTable()
    key = segment(4096)
    region = table.register("input0", key, 128, 1024)
    assert region == Region(
        name="input0", key=key, path=f"{SHM_DIR}/{key[1:]}", offset=128, byte_size=1024
    )
    other = table.register("a-output", key, 0, 4096)  # the whole segment, another name
    assert table.status(None) == [other, region]  # sorted by name
    assert table.status("") == table.status(None)
    assert table.status("input0") == [region]
    assert table.resolve("input0") is region
    assert len(table) == 2

    assert table.unregister("input0") == [region]
    assert table.unregister("input0") == []  # unknown: nothing, no error (Triton's way)
    assert table.status(None) == [other]
    assert table.unregister(None) == [other]
    assert table.status(None) == [] and len(table) == 0


def test_unregister_all_with_an_empty_name(segment: Segment) -> None:
    table = RegionTable()
    key = segment(64)
    table.register("a", key, 0, 8)
    table.register("b", key, 8, 8)
    assert {r.name for r in table.unregister("")} == {"a", "b"}
    assert len(table) == 0


def test_a_key_without_its_slash_and_with_many_name_the_same_file(segment: Segment) -> None:
    # shm_open drops leading slashes: "x", "/x" and "//x" are one segment.
    table = RegionTable()
    key = segment(64)
    bare = key.lstrip("/")
    assert table.register("a", bare, 0, 8).path == f"{SHM_DIR}/{bare}"
    assert table.register("b", "//" + bare, 0, 8).path == f"{SHM_DIR}/{bare}"
    assert table.status("a")[0].key == bare  # the key as the client gave it


def test_unknown_names_in_tritons_words() -> None:
    table = RegionTable()
    with pytest.raises(NotFound) as status:
        table.status("nope")
    assert status.value.message == "Unable to find system shared memory region: 'nope'"
    with pytest.raises(NotFound) as resolve:
        table.resolve("nope")
    assert resolve.value.message == "Unable to find shared memory region: 'nope'"


def test_a_taken_name_is_already_exists(segment: Segment) -> None:
    table = RegionTable()
    key = segment(64)
    table.register("r", key, 0, 64)
    with pytest.raises(RegionExists) as caught:
        table.register("r", key, 0, 32)
    error = caught.value
    assert error.message == "shared memory region 'r' already in manager"
    # Triton's HTTP server answers ALREADY_EXISTS with 400, its gRPC server with ALREADY_EXISTS.
    assert isinstance(error, InvalidArgument) and error.http_status == 400
    assert error.grpc_code == grpc.StatusCode.ALREADY_EXISTS
    assert table.status("r")[0].byte_size == 64  # the first registration stands


@pytest.mark.parametrize(
    "key",
    ["", "/", "///", "/a/b", "a/", "/..", "..", "/.", "a\0b", "/" + "k" * 255],
)
def test_a_key_must_be_a_plain_segment_name(key: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        RegionTable().register("r", key, 0, 8)
    assert caught.value.message.startswith(
        f"cannot register shared memory region 'r' - invalid shm key '{key}': "
    )


def test_a_missing_segment(made: list[Path]) -> None:
    key = "/" + unique()
    with pytest.raises(InvalidArgument) as caught:
        RegionTable().register("r", key, 0, 8)
    message = caught.value.message
    assert message.startswith(f"Unable to open shared memory region: '{key}' (")
    assert f"{SHM_DIR}/{key[1:]} does not exist" in message


def test_a_segment_that_is_not_a_regular_file(segment: Segment, made: list[Path]) -> None:
    directory = Path(SHM_DIR, unique())
    directory.mkdir()
    made.append(directory)
    link = Path(SHM_DIR, unique())
    link.symlink_to(Path(SHM_DIR, segment(64)[1:]))  # a link to a real segment
    made.append(link)
    table = RegionTable()
    for path in (directory, link):
        with pytest.raises(InvalidArgument) as caught:
            table.register("r", "/" + path.name, 0, 8)
        assert caught.value.message == (
            f"Unable to open shared memory region: '/{path.name}' ({path} is not a regular file)"
        )
    assert len(table) == 0


@pytest.mark.parametrize(
    ("offset", "byte_size", "size"),
    [(0, 65, 64), (1, 64, 64), (64, 1, 64), (2**64 - 1, 1, 64), (0, 2**64 - 1, 64)],
)
def test_out_of_bounds(segment: Segment, offset: int, byte_size: int, size: int) -> None:
    key = segment(size)
    with pytest.raises(InvalidArgument) as caught:
        RegionTable().register("r", key, offset, byte_size)
    assert caught.value.message == (
        f"failed to register shared memory region 'r': invalid args (offset {offset}"
        f" + byte_size {byte_size} is beyond the end of segment '{key}', {size} bytes)"
    )


def test_in_bounds_up_to_the_last_byte(segment: Segment) -> None:
    key = segment(64)
    assert RegionTable().register("r", key, 63, 1).byte_size == 1


@pytest.mark.parametrize(
    ("offset", "byte_size"), [(-1, 8), (0, -8), (True, 8), (0, 8.0), ("0", 8), (0, None)]
)
def test_offset_and_size_are_non_negative_integers(
    segment: Segment, offset: object, byte_size: object
) -> None:
    key = segment(64)
    with pytest.raises(InvalidArgument) as caught:
        RegionTable().register("r", key, offset, byte_size)  # type: ignore[arg-type]
    assert "invalid args (offset and byte_size must be non-negative integers" in str(caught.value)


def test_an_empty_region_is_refused(segment: Segment) -> None:
    with pytest.raises(InvalidArgument, match=r"byte_size must not be 0"):
        RegionTable().register("r", segment(64), 0, 0)


def test_names(segment: Segment) -> None:
    table = RegionTable()
    key = segment(64)
    with pytest.raises(InvalidArgument) as empty:
        table.register("", key, 0, 8)
    assert empty.value.message == NEED_NAME
    with pytest.raises(InvalidArgument, match=f"at most {MAX_NAME} characters"):
        table.register("n" * (MAX_NAME + 1), key, 0, 8)
    assert table.register("n" * MAX_NAME, key, 0, 8).name == "n" * MAX_NAME
    assert table.register("région ✓ with spaces", key, 0, 8).name == "région ✓ with spaces"


def test_the_table_is_bounded(segment: Segment) -> None:
    table = RegionTable(max_regions=2)
    key = segment(64)
    table.register("a", key, 0, 8)
    table.register("b", key, 0, 8)
    with pytest.raises(Overloaded, match=r"holds 2 regions already .*unregister some first"):
        table.register("c", key, 0, 8)
    table.unregister("a")
    table.register("c", key, 0, 8)


def test_nothing_stays_open(segment: Segment) -> None:
    key = segment(64)
    table = RegionTable()
    path = table.register("r", key, 0, 64).path
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("no /proc/self/fd")
    opened = set()
    for fd in fds.iterdir():
        try:
            opened.add(os.readlink(fd))
        except OSError:
            continue
    assert path not in opened
    maps = Path("/proc/self/maps").read_text()
    assert path not in maps


def test_the_table_holds_facts_only(segment: Segment, made: list[Path]) -> None:
    # A segment removed after registration: the region is still resolved; whoever
    # opens its path per request finds out (the table keeps nothing open).
    key = segment(64)
    table = RegionTable()
    region = table.register("r", key, 0, 64)
    made[-1].unlink()
    assert table.resolve("r") == region
