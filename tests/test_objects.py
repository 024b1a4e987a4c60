"""Tests for anyserve.objects: round trips, hostile references, atomicity, expiry, facades."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from anyserve import objects
from anyserve.errors import AnyServeError, InvalidArgument, NotFound, PayloadTooLarge
from anyserve.objects import HEADER_LEN, BlockingObjects, ObjectStore, ObjRef
from anyserve.objects.sweeper import SweepReport

pytestmark = pytest.mark.anyio

HEX = "0123456789abcdef"


def visible_objects(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("obj-"))


def temp_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def age(path: Path, seconds: float) -> None:
    """Move a file's mtime ``seconds`` into the past (no sleeping)."""
    past = time.time() - seconds
    os.utime(path, (past, past), follow_symlinks=False)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "store", ttl=60.0)


# --------------------------------------------------------------------------- ObjRef


async def test_objref_shape_and_identity(store: ObjectStore) -> None:
    ref = await store.create(b"x")
    assert isinstance(ref, ObjRef)
    assert ref.id.startswith("obj-") and len(ref.id) == 36
    assert all(c in HEX for c in ref.id[4:])
    assert str(ref) == ref.id
    assert ref.__anyserve_wire__() == ref.id
    assert ref.path == store.root / f"{ref.id}.bin"
    assert ref.path.is_file()
    other = ObjRef(ref.id, Path("/elsewhere") / f"{ref.id}.bin")
    assert other == ref and hash(other) == hash(ref)
    assert ref != await store.create(b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ref.id = "obj-" + "0" * 32  # type: ignore[misc]
    with pytest.raises(InvalidArgument):
        ObjRef("obj-123", Path("/x/obj-123.bin"))
    with pytest.raises(InvalidArgument):
        ObjRef(ref.id, Path("/x/other.bin"))


# --------------------------------------------------------------------------- round trips

ROUND_TRIP_CASES: list[tuple[Any, type]] = [
    (b"", bytes),
    (b"\x00\xffbinary\n", bytes),
    (bytes(range(256)) * 20, bytes),
    (bytearray(b"mutable"), bytearray),
    ("", str),
    ("héllo wörld ✓ 😀", str),
    ("lone surrogate \udc80", str),
    ({"a": [1, 2.5, None, True, {"b": "c"}], "ü": {}}, dict),
    ([1, "two", 3.0, False, None, [], {}], list),
    (0, int),
    (10**40, int),
    (-1.25, float),
    (True, bool),
    (False, bool),
    (None, type(None)),
]


@pytest.mark.parametrize(("value", "kind"), ROUND_TRIP_CASES, ids=lambda v: type(v).__name__)
async def test_round_trip_preserves_value_and_type(
    store: ObjectStore, value: Any, kind: type
) -> None:
    ref = await store.create(value)
    out = await store.get(ref)
    assert type(out) is kind
    assert out == value


async def test_memoryview_comes_back_as_bytes(store: ObjectStore) -> None:
    data = bytes(range(100))
    ref = await store.create(memoryview(data)[10:60])
    assert await store.get(ref) == data[10:60]
    # A non-contiguous view is stored by value too.
    ref = await store.create(memoryview(data)[::2])
    assert await store.get(ref) == data[::2]


async def test_tuples_come_back_as_lists(store: ObjectStore) -> None:
    ref = await store.create({"shape": (2, 3)})
    assert await store.get(ref) == {"shape": [2, 3]}


async def test_large_values_round_trip(store: ObjectStore) -> None:
    big = os.urandom(3 << 20)
    assert await store.get(await store.create(big)) == big
    text = "ß" * (2 << 20)
    assert await store.get(await store.create(text)) == text
    doc = {"rows": [[i, str(i)] for i in range(200_000)]}
    assert await store.get(await store.create(doc)) == doc


async def test_numpy_round_trip(store: ObjectStore) -> None:
    np = pytest.importorskip("numpy")
    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        np.array(7, dtype=np.int16),
        np.array([True, False]),
        np.arange(5, dtype=">u4"),
        np.zeros(3, dtype=[("x", "<f8"), ("y", "<i4")]),
        np.array(["ab", "çd"]),
        np.random.default_rng(0).random((512, 1024)),  # 4 MiB: encoded in a thread
    ]
    for arr in arrays:
        out = await store.get(await store.create(arr))
        assert type(out) is np.ndarray
        assert out.dtype == arr.dtype and out.shape == arr.shape
        assert np.array_equal(out, arr)
        assert out.flags.writeable


async def test_on_disk_header(store: ObjectStore) -> None:
    ref = await store.create("text")
    raw = ref.path.read_bytes()
    assert len(raw[:HEADER_LEN]) == 32
    assert raw[:HEADER_LEN] == b"anyserve-object/1 str          \n"
    assert raw[HEADER_LEN:] == b"text"


async def test_unsupported_data_is_invalid_and_writes_nothing(store: ObjectStore) -> None:
    np = pytest.importorskip("numpy")
    bad: list[Any] = [
        {1, 2},
        object(),
        1j,
        {1: "int key"},
        {"nested": {None: 1}},
        [b"bytes inside json"],
        np.array([object()], dtype=object),
        np.float32(1.0),
    ]
    for value in bad:
        with pytest.raises(InvalidArgument):
            await store.create(value)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidArgument):
        await store.create(cyclic)
    assert not store.root.exists() or list(store.root.iterdir()) == []


async def test_corrupt_object_file_is_an_internal_error(store: ObjectStore) -> None:
    ref = await store.create(b"ok")
    ref.path.write_bytes(b"not an anyserve object at all, no header")
    with pytest.raises(AnyServeError) as info:
        await store.get(ref)
    assert type(info.value) is AnyServeError
    assert ref.id in info.value.message


async def test_root_is_private_and_created_lazily(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    store = ObjectStore(root)
    assert not root.exists()
    assert await store.exists("obj-" + "0" * 32) is False
    with pytest.raises(NotFound):
        await store.get("obj-" + "0" * 32)
    assert await store.sweep() == 0
    ref = await store.create(b"x")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(ref.path.stat().st_mode) == 0o600
    # The root is re-created if something removes it.
    ref.path.unlink()
    root.rmdir()
    ref2 = await store.create(b"again")
    assert await store.get(ref2) == b"again"


async def test_get_exists_delete(store: ObjectStore) -> None:
    ref = await store.create([1, 2])
    assert await store.exists(ref)
    assert await store.exists(ref.id)
    assert await store.exists(ref.id.encode())
    assert await store.exists(str(ref.path))  # the seed's path form
    assert await store.get(ref.id.encode()) == [1, 2]
    assert await store.delete(ref) is True
    assert not ref.path.exists()
    assert await store.delete(ref) is False
    assert await store.exists(ref) is False
    with pytest.raises(NotFound) as info:
        await store.get(ref)
    assert ref.id in info.value.message


async def test_refs_are_resolved_against_this_store(tmp_path: Path) -> None:
    one = ObjectStore(tmp_path / "one")
    two = ObjectStore(tmp_path / "two")
    ref = await one.create(b"in one")
    assert await two.exists(ref) is False
    with pytest.raises(NotFound):
        await two.get(ref)  # never reads ref.path of another store
    with pytest.raises(InvalidArgument):
        await two.get(str(ref.path))  # a path into another directory


async def test_path_form_through_symlinked_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    store = ObjectStore(tmp_path / "link" / "store")
    ref = await store.create(b"v")
    assert await store.get(str(tmp_path / "link" / "store" / f"{ref.id}.bin")) == b"v"
    assert await store.get(str(tmp_path / "real" / "store" / f"{ref.id}.bin")) == b"v"


async def test_fsync_mode(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", fsync=True)
    assert await store.get(await store.create({"k": "v"})) == {"k": "v"}


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        ObjectStore("/tmp/x", ttl=0)
    with pytest.raises(ValueError):
        ObjectStore("/tmp/x", max_object_size=-1)
    with pytest.raises(ValueError):
        ObjectStore("/tmp/x", tmp_grace=-1)


# --------------------------------------------------------------------------- hostile references


def snapshot(paths: list[Path]) -> list[tuple[bytes, int, float]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((p.read_bytes(), st.st_size, st.st_mtime))
    return out


@pytest.fixture
def outside(tmp_path: Path) -> dict[str, Any]:
    """Files outside the store that nothing may touch."""
    out = tmp_path / "outside"
    out.mkdir()
    oid = "obj-" + "ab" * 16
    secret = out / "secret.txt"
    secret.write_bytes(b"top secret")
    fake_obj = out / f"{oid}.bin"
    fake_obj.write_bytes(b"anyserve-object/1 bytes        \nnot yours")
    old = time.time() - 10 * 3600  # old enough that a sweep would remove it if it could
    os.utime(fake_obj, (old, old))
    return {"dir": out, "oid": oid, "secret": secret, "fake": fake_obj}


def hostile_refs(root: Path, outside: dict[str, Any]) -> list[Any]:
    oid, fake, secret = outside["oid"], outside["fake"], outside["secret"]
    name = f"{oid}.bin"
    return [
        str(fake),
        str(secret),
        "/etc/passwd",
        f"{root}/../outside/{name}",
        f"{root}/./{name}",
        f"{root}//{name}",
        f"../outside/{name}",
        f"../{oid}",
        f"..%2foutside%2f{name}",
        f"%2e%2e%2foutside%2f{name}",
        f"{root}/%2e%2e%2foutside%2f{name}",
        f"..\\outside\\{name}",
        f"file://{fake}",
        f"outside/{name}",
        name,
        f"{oid}\x00",
        f"{oid}\x00.bin",
        f"{root}/{name}\x00",
        "\x00",
        "",
        "a" * 10_000,
        "obj-" + "a" * 10_000,
        "obj-" + "a" * 31,
        "obj-" + "a" * 33,
        "obj-" + "A" * 32,
        "OBJ-" + "a" * 32,
        "obj-" + "g" * 32,
        "obj_" + "a" * 32,
        f" {oid}",
        f"{oid}\n",
        f"{oid}/",
        b"",
        b"../outside/" + name.encode(),
        oid.encode() + b"\x00",
        b"\xff" * 36,
        b"a" * 10_000,
        str(fake).encode(),
        123,
        None,
        1.5,
        ["obj-" + "a" * 32],
    ]


async def test_hostile_references_are_rejected_and_touch_nothing(
    store: ObjectStore, outside: dict[str, Any]
) -> None:
    await store.create(b"something in the store")
    guarded = [outside["secret"], outside["fake"]]
    before = snapshot(guarded)
    for value in hostile_refs(store.root, outside):
        for op in (store.get, store.exists, store.delete):
            with pytest.raises(InvalidArgument):
                await op(value)
        with pytest.raises(InvalidArgument):
            store.parse_ref(value)
    assert await store.sweep(now=time.time() + 10**6) == 1  # only our own object
    assert snapshot(guarded) == before
    assert sorted(p.name for p in outside["dir"].iterdir()) == sorted(p.name for p in guarded)


async def test_error_messages_name_the_reference_but_stay_short(store: ObjectStore) -> None:
    with pytest.raises(InvalidArgument) as info:
        await store.get("obj-" + "A" * 32)
    assert "obj-AAAA" in info.value.message
    with pytest.raises(InvalidArgument) as info:
        await store.get("x" * 10_000)
    assert len(info.value.message) < 300


async def test_symlinks_in_the_root_are_refused(
    store: ObjectStore, outside: dict[str, Any]
) -> None:
    await store.create(b"make the root")
    link_to_file = "obj-" + "1" * 32
    link_to_dir = "obj-" + "2" * 32
    dangling = "obj-" + "3" * 32
    inside = "obj-" + "4" * 32
    (store.root / f"{link_to_file}.bin").symlink_to(outside["secret"])
    (store.root / f"{link_to_dir}.bin").symlink_to(outside["dir"])
    (store.root / f"{dangling}.bin").symlink_to(outside["dir"] / "missing")
    real = await store.create(b"real")
    (store.root / f"{inside}.bin").symlink_to(real.path)
    guarded = [outside["secret"], outside["fake"]]
    before = snapshot(guarded)
    for oid in (link_to_file, link_to_dir, dangling, inside):
        for value in (oid, str(store.root / f"{oid}.bin")):
            for op in (store.get, store.exists, store.delete):
                with pytest.raises(InvalidArgument) as info:
                    await op(value)
                assert oid in info.value.message
    # Make every link look ancient: the sweeper must not follow or count them.
    for oid in (link_to_file, link_to_dir, dangling, inside):
        age(store.root / f"{oid}.bin", 10**6)
    await store.sweep(now=time.time() + 10**6)
    assert snapshot(guarded) == before
    assert not (outside["dir"] / "missing").exists()


async def test_fifo_and_directory_named_like_objects(store: ObjectStore) -> None:
    await store.create(b"make the root")
    fifo = "obj-" + "5" * 32
    directory = "obj-" + "6" * 32
    os.mkfifo(store.root / f"{fifo}.bin")
    (store.root / f"{directory}.bin").mkdir()
    for oid in (fifo, directory):
        with anyio.fail_after(5):  # opening a FIFO must not block
            for op in (store.get, store.exists, store.delete):
                with pytest.raises(InvalidArgument):
                    await op(oid)


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_writers_and_readers(store: ObjectStore) -> None:
    rng = random.Random(1234)
    per_writer = 12
    written: list[tuple[ObjRef, str]] = []
    send, receive = anyio.create_memory_object_stream[tuple[ObjRef, str]](100)
    checked: list[ObjRef] = []
    scanned = 0
    writers_done = anyio.Event()

    async def writer(n: int, out: Any) -> None:
        async with out:
            for i in range(per_writer):
                size = rng.choice([0, 1, 100, 4096, 65_536, 300_000, 1_500_000])
                body = rng.randbytes(size)
                data = hashlib.sha256(body).digest() + body  # self-checking payload
                value: Any = bytearray(data) if (n + i) % 3 == 0 else data
                ref = await store.create(value)
                await out.send((ref, hashlib.sha256(data).hexdigest()))

    async def reader(inbox: Any) -> None:
        async with inbox:
            async for ref, digest in inbox:
                assert await store.exists(ref)
                got = await store.get(ref)
                assert hashlib.sha256(got).hexdigest() == digest
                written.append((ref, digest))
                checked.append(ref)

    async def scanner() -> None:
        # Reads whatever is visible while writers run: never a partial object.
        nonlocal scanned
        while not writers_done.is_set():
            for name in visible_objects(store.root) if store.root.exists() else []:
                got = await store.get(name[: -len(".bin")])
                assert hashlib.sha256(got[32:]).digest() == got[:32]
                scanned += 1
            await anyio.lowlevel.checkpoint()

    async def writers(outs: list[Any]) -> None:
        async with anyio.create_task_group() as wtg:
            for n, out in enumerate(outs):
                wtg.start_soon(writer, n, out)
        writers_done.set()

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg, send, receive:
            for _ in range(8):
                tg.start_soon(reader, receive.clone())
            tg.start_soon(scanner)
            tg.start_soon(writers, [send.clone() for _ in range(8)])

    assert len(checked) == 8 * per_writer
    assert len(set(checked)) == len(checked)
    assert scanned > 0
    assert temp_files(store.root) == []

    # Eight readers of every object at once.
    async def read_all() -> None:
        for ref, digest in written:
            assert hashlib.sha256(await store.get(ref)).hexdigest() == digest

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(read_all)


# --------------------------------------------------------------------------- atomicity

CRASHING_WRITER = textwrap.dedent(
    """
    import sys
    import aiofiles.os
    import anyio
    from anyserve.objects import ObjectStore

    async def stuck_replace(*args, **kwargs):
        print("ready", flush=True)  # the temporary file is complete, not yet published
        await anyio.sleep(3600)

    aiofiles.os.replace = stuck_replace

    async def main():
        await ObjectStore(sys.argv[1]).create(b"x" * 200_000)

    anyio.run(main)
    """
)


async def test_writer_killed_before_publishing_leaves_no_object(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with anyio.fail_after(30):
        proc = await anyio.open_process(
            [sys.executable, "-c", CRASHING_WRITER, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        async with proc:
            assert proc.stdout is not None
            line = await proc.stdout.receive()
            assert line.startswith(b"ready"), line
            proc.kill()  # SIGKILL: no finally blocks, no cleanup
            assert await proc.wait() == -9
    assert visible_objects(root) == []
    [tmp_name] = temp_files(root)
    assert (root / tmp_name).stat().st_size == HEADER_LEN + 200_000
    oid = tmp_name[len(".tmp-") : len(".tmp-") + 36]
    store = ObjectStore(root, tmp_grace=60.0)
    assert await store.exists(oid) is False
    with pytest.raises(NotFound):
        await store.get(oid)
    with pytest.raises(InvalidArgument):
        await store.get(tmp_name)  # temporary files cannot be named by a reference
    assert await store.sweep() == 0  # young: could still be an active writer
    assert await store.sweep(now=time.time() + 61) == 1
    assert list(root.iterdir()) == []


async def test_crashed_writer_partial_temp_file_is_invisible_and_swept(
    store: ObjectStore,
) -> None:
    live = await store.create(b"live object")
    oid = "obj-" + "c" * 32
    partial = store.root / f".tmp-{oid}-0badc0de"
    partial.write_bytes(b"anyserve-object/1 bytes        \nhalf of the da")
    assert await store.exists(oid) is False
    with pytest.raises(NotFound):
        await store.get(oid)
    young = store.root / f".tmp-obj-{'d' * 32}-12345678"
    young.write_bytes(b"being written right now")
    age(partial, 61)
    assert await store.sweep() == 1
    assert not partial.exists()
    assert young.exists()  # within the grace period: left alone
    assert await store.get(live) == b"live object"


async def test_failed_write_leaves_nothing(store: ObjectStore, monkeypatch: Any) -> None:
    await store.create(b"make the root")
    before = sorted(os.listdir(store.root))

    async def failing_replace(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aiofiles.os, "replace", failing_replace)
    with pytest.raises(OSError):
        await store.create(b"doomed")
    assert sorted(os.listdir(store.root)) == before


async def test_cancelled_write_leaves_nothing(store: ObjectStore, monkeypatch: Any) -> None:
    await store.create(b"make the root")
    before = sorted(os.listdir(store.root))
    real_open = aiofiles.open
    writing = anyio.Event()

    class Stalled:
        def __init__(self, f: Any) -> None:
            self.f = f

        async def writelines(self, parts: Any) -> None:
            writing.set()
            await anyio.sleep_forever()

        async def close(self) -> None:
            await self.f.close()

    async def stalled_open(*args: Any, **kwargs: Any) -> Stalled:
        return Stalled(await real_open(*args, **kwargs))

    monkeypatch.setattr(aiofiles, "open", stalled_open)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.create, b"never finished")
            await writing.wait()
            assert len(temp_files(store.root)) == 1
            tg.cancel_scope.cancel()
    assert sorted(os.listdir(store.root)) == before


# --------------------------------------------------------------------------- expiry and sweeping


async def test_expired_object_is_not_found_before_sweeping(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", ttl=5.0)
    ref = await store.create({"v": 1})
    age(ref.path, 6)
    assert ref.path.exists()
    with pytest.raises(NotFound) as info:
        await store.get(ref)
    assert ref.id in info.value.message
    assert "expired" in info.value.message
    assert await store.exists(ref) is False
    assert await store.delete(ref) is False  # removed, but it was already gone
    assert not ref.path.exists()


async def test_sweep_removes_expired_objects_only(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", ttl=100.0)
    old = [await store.create(i) for i in range(3)]
    fresh = [await store.create(f"fresh {i}") for i in range(2)]
    for ref in old:
        age(ref.path, 101)
    foreign = store.root / "notes.txt"
    foreign.write_text("not ours")
    age(foreign, 10**6)
    assert await store.sweep() == 3
    assert visible_objects(store.root) == sorted(f"{r.id}.bin" for r in fresh)
    assert foreign.exists()
    assert await store.sweep() == 0
    # ``now`` stands in for the clock.
    assert await store.sweep(now=time.time() + 101) == 2
    assert visible_objects(store.root) == []


async def test_run_sweeper_sweeps_and_survives_errors(
    store: ObjectStore, monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0
    removed = anyio.Event()
    real_sweep = store.sweep_report

    async def flaky_sweep(now: float | None = None) -> SweepReport:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("disk on fire")
        report = await real_sweep(now)
        if not ref.path.exists():
            removed.set()
        return report

    ref = await store.create(b"old")
    age(ref.path, 61)
    monkeypatch.setattr(store, "sweep_report", flaky_sweep)
    caplog.set_level(logging.ERROR, logger="anyserve.objects")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.run_sweeper, 0.001)
            await removed.wait()  # swept by a call after the failing one
            tg.cancel_scope.cancel()  # the sweeper must let cancellation through
    assert "disk on fire" in caplog.text
    assert calls >= 2


# --------------------------------------------------------------------------- size limit


async def test_size_limit(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "s", max_object_size=100)
    assert await store.get(await store.create(b"x" * 100)) == b"x" * 100
    with pytest.raises(PayloadTooLarge):
        await store.create(b"x" * 101)
    with pytest.raises(PayloadTooLarge):
        await store.create(bytearray(101))
    with pytest.raises(PayloadTooLarge):
        await store.create("é" * 51)  # 102 bytes of UTF-8
    with pytest.raises(PayloadTooLarge):
        await store.create(list(range(100)))
    with pytest.raises(PayloadTooLarge):
        await store.create(memoryview(b"y" * 200))
    np = pytest.importorskip("numpy")
    with pytest.raises(PayloadTooLarge):
        await store.create(np.zeros(100, dtype=np.uint8))  # + the .npy header
    assert len(visible_objects(store.root)) == 1
    assert temp_files(store.root) == []


# --------------------------------------------------------------------------- facades


async def test_blocking_objects_in_worker_thread(store: ObjectStore) -> None:
    blocking = BlockingObjects(store)

    def handler() -> tuple[Any, bool, bool, bool]:
        ref = blocking.create({"from": "thread"})
        assert isinstance(ref, ObjRef)
        value = blocking.get(ref)
        present = blocking.exists(ref.id)
        deleted = blocking.delete(ref)
        return value, present, deleted, blocking.exists(ref)

    assert await anyio.to_thread.run_sync(handler) == ({"from": "thread"}, True, True, False)

    def missing() -> None:
        blocking.get("obj-" + "0" * 32)

    with pytest.raises(NotFound):
        await anyio.to_thread.run_sync(missing)
    with pytest.raises(RuntimeError):
        blocking.exists("obj-" + "0" * 32)  # not from the event loop thread


def test_module_functions_outside_a_handler() -> None:
    message = "anyserve.objects.* is only available inside a handler"
    calls: list[Callable[[], object]] = [
        lambda: objects.create(b"x"),
        lambda: objects.get("obj-" + "0" * 32),
        lambda: objects.delete("obj-" + "0" * 32),
        lambda: objects.exists("obj-" + "0" * 32),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        assert str(info.value) == message


async def test_module_functions_bound_to_an_async_facade(store: ObjectStore) -> None:
    token = objects.bind(store)
    try:
        ref = await objects.create("async handler")
        assert await objects.get(ref) == "async handler"
        assert await objects.exists(ref) is True
        assert await objects.delete(ref) is True
        assert await objects.exists(ref) is False
    finally:
        objects.reset(token)
    with pytest.raises(RuntimeError):
        objects.get(ref)


async def test_module_functions_bound_to_a_blocking_facade(store: ObjectStore) -> None:
    def sync_handler() -> Any:
        ref = objects.create(b"sync handler")
        assert isinstance(ref, ObjRef)
        assert objects.exists(ref) is True
        value = objects.get(ref)
        assert objects.delete(ref) is True
        return value

    # Bound in the event loop task; anyio copies the context into the worker thread.
    token = objects.bind(BlockingObjects(store))
    try:
        assert await anyio.to_thread.run_sync(sync_handler) == b"sync handler"
    finally:
        objects.reset(token)

    # Bound inside the thread itself.
    def bind_in_thread() -> Any:
        inner = objects.bind(BlockingObjects(store))
        try:
            return sync_handler()
        finally:
            objects.reset(inner)

    assert await anyio.to_thread.run_sync(bind_in_thread) == b"sync handler"
    with pytest.raises(RuntimeError):
        objects.create(b"x")


# --------------------------------------------------------------------------- numpy stays optional

WITHOUT_NUMPY = textwrap.dedent(
    """
    import sys
    sys.modules["numpy"] = None  # any "import numpy" now raises ImportError
    import anyio
    from anyserve.errors import InvalidArgument
    from anyserve.objects import ObjectStore

    async def main():
        store = ObjectStore(sys.argv[1])
        ref = await store.create({"plain": b"x".decode()})
        assert await store.get(ref) == {"plain": "x"}
        assert await store.get(await store.create(b"raw")) == b"raw"
        try:
            await store.get(sys.argv[2])
        except InvalidArgument as exc:
            assert "numpy" in exc.message, exc.message
        else:
            raise AssertionError("expected InvalidArgument")
        print("ok")

    anyio.run(main)
    """
)


async def test_works_without_numpy(store: ObjectStore) -> None:
    np = pytest.importorskip("numpy")
    arr_ref = await store.create(np.arange(3))
    result = await anyio.run_process(
        [sys.executable, "-c", WITHOUT_NUMPY, str(store.root), arr_ref.id], check=False
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.strip() == b"ok"
