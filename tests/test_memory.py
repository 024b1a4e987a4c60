"""A process that has called ``memory.return_big_blocks()`` gives big freed
blocks back to the system: after a burst of big buffers, a second burst of
smaller ones (which glibc's sliding mmap threshold would serve from the heap,
interleaved with small allocations that pin it) leaves no resident growth."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import os, sys
    from anyserve import memory

    applied = memory.return_big_blocks()

    def rss_mib():
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    bigs = [b"x" * (8 << 20) for _ in range(4)]  # raises glibc's threshold past 8 MiB
    del bigs
    before = rss_mib()
    smalls, bigs = [], []
    for _ in range(10):
        bigs.append(b"x" * (4 << 20))
        smalls.append(bytes(3000))  # malloc'd, not pymalloc'd: pins the heap
    del bigs
    print(applied, rss_mib() - before)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, Linux only")
def test_freed_big_buffers_leave_no_resident_growth() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    applied, growth = done.stdout.split()
    assert applied == "True", done.stdout
    assert float(growth) < 2.0, f"{growth} MiB still resident after the burst was freed"


TRIM_CHILD = textwrap.dedent(
    """
    import os
    import anyio
    from anyserve import memory

    memory.return_big_blocks()

    def rss_mib():
        pages = int(open("/proc/self/statm").read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    # 100 MiB of mid-sized blocks (malloc'd, under the mmap threshold), then one
    # kept at the heap's top: freeing the rest leaves free pages glibc keeps.
    blocks = [bytes(64 * 1024) for _ in range(1600)]
    top = bytes(64 * 1024)
    del blocks
    before = rss_mib()

    async def one_pass():
        with anyio.move_on_after(0.3):
            await memory.trim_forever(0.05)

    anyio.run(one_pass)
    print(before - rss_mib())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, Linux only")
def test_trimming_gives_the_heaps_free_pages_back() -> None:
    done = subprocess.run(
        [sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    assert float(done.stdout) > 50.0, f"only {done.stdout.strip()} MiB given back"


def test_settle_gc_freezes_what_is_there_and_collects_the_young_less_often() -> None:
    # In a fresh interpreter: it changes the whole process.
    code = (
        "import gc; from anyserve import memory; memory.settle_gc();"
        " print(gc.get_freeze_count() > 1000, gc.get_threshold()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "10000"]
