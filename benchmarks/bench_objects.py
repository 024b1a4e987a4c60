"""Object store throughput: ``create`` + ``get`` against a plain file write + read.

Run from the repository root::

    python -m benchmarks.bench_objects [--dir DIR] [--budget SECONDS]

For each size (1 MiB and 64 MiB) it times, on the same disk and in the same directory,

* store: ``await store.create(data)`` then ``await store.get(ref)`` (aiofiles, temporary
  file + rename, header, checks), and
* plain: ``open(path, "wb").write(data)`` then ``open(path, "rb").read()``, synchronously on
  the calling thread (the cheapest possible way to do the same I/O).

Deleting the files afterwards is not timed for either. Neither side calls fsync, so both
mostly measure the page cache. Throughput counts each object once per create+get pair
(MiB/s = object size x pairs per second). ``ratio`` is store/plain throughput (1.0 = no
overhead). Each case runs for at most ``budget`` seconds (default 2.5, four cases: the
whole run stays well under 30 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from anyserve.objects import ObjectStore

MIB = 1 << 20
SIZES = (1 * MIB, 64 * MIB)
MAX_ITERATIONS = 2000


async def _bench_store(store: ObjectStore, data: bytes, budget: float) -> tuple[int, float]:
    # Warm-up (first-use directory creation, thread pool start).
    await store.delete(await store.create(data))
    ops = 0
    spent = 0.0
    while spent < budget and ops < MAX_ITERATIONS:
        start = time.perf_counter()
        ref = await store.create(data)
        out = await store.get(ref)
        spent += time.perf_counter() - start
        if len(out) != len(data):
            raise AssertionError("store returned the wrong object")
        await store.delete(ref)
        ops += 1
    return ops, spent


def _bench_plain(directory: Path, data: bytes, budget: float) -> tuple[int, float]:
    ops = 0
    spent = 0.0
    path = directory / "plain.bin"
    while spent < budget and ops < MAX_ITERATIONS:
        start = time.perf_counter()
        with open(path, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            out = f.read()
        spent += time.perf_counter() - start
        if len(out) != len(data):
            raise AssertionError("plain read returned the wrong size")
        os.unlink(path)
        ops += 1
    return ops, spent


async def _run(directory: Path, budget: float) -> list[dict[str, Any]]:
    store = ObjectStore(directory / "store")
    rows: list[dict[str, Any]] = []
    for size in SIZES:
        data = os.urandom(size)
        _bench_plain(directory, data, 0.0)  # warm-up
        plain_ops, plain_s = _bench_plain(directory, data, budget)
        store_ops, store_s = await _bench_store(store, data, budget)
        store_rate = store_ops / store_s
        plain_rate = plain_ops / plain_s
        rows.append(
            {
                "size_bytes": size,
                "store_ops_s": store_rate,
                "store_mib_s": store_rate * size / MIB,
                "store_iterations": store_ops,
                "plain_ops_s": plain_rate,
                "plain_mib_s": plain_rate * size / MIB,
                "plain_iterations": plain_ops,
                "ratio": store_rate / plain_rate,
            }
        )
    return rows


def run(directory: str | Path | None = None, budget: float = 2.5) -> list[dict[str, Any]]:
    """Run the benchmark in a fresh directory under ``directory`` (default: the system
    temporary directory) and return one row per object size; the directory is removed."""
    work = Path(tempfile.mkdtemp(prefix="anyserve-bench-objects-", dir=directory))
    try:
        return anyio.run(_run, work, budget)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'size':>8}  {'store MiB/s':>11}  {'store ops/s':>11}  "
        f"{'plain MiB/s':>11}  {'plain ops/s':>11}  {'store/plain':>11}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['size_bytes'] // MIB:>4} MiB  {row['store_mib_s']:>11.1f}  "
            f"{row['store_ops_s']:>11.1f}  {row['plain_mib_s']:>11.1f}  "
            f"{row['plain_ops_s']:>11.1f}  {row['ratio']:>11.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="parent directory (default: system tmp)")
    parser.add_argument("--budget", type=float, default=2.5, help="seconds per case")
    args = parser.parse_args()
    started = time.perf_counter()
    rows = run(args.dir, args.budget)
    print(format_table(rows))
    print(f"(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
