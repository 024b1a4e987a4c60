"""``python -m benchmarks [NAME ...]`` (``make bench``): run every
``benchmarks.bench_*`` module's ``run()`` (or only those named, e.g.
``replica``) and print one table per benchmark, after the machine's facts.

Exits 1 when a benchmark fails (the others still run), 2 for an unknown name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import pkgutil
import platform
import re
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import anyserve  # noqa: F401  (first: it turns gRPC's fork support off before grpc loads)
import benchmarks

# Columns whose numbers are ratios ("replica/bare", "ratio", "speed_ratio").
_RATIO = re.compile(r"/|(^|[^a-z])ratio($|[^a-z])")
# Run first when present; the rest follow in name order.
PREFERRED = ("bench_replica",)


def discover() -> list[str]:
    names = sorted(
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith("bench_")
    )
    return [n for n in PREFERRED if n in names] + [n for n in names if n not in PREFERRED]


def machine_facts() -> str:
    import google.protobuf
    import grpc

    try:
        import uvloop  # noqa: F401

        loop = f"uvloop {importlib.metadata.version('uvloop')} (client and servers)"
    except ImportError:
        loop = "asyncio (uvloop not installed)"

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = f"{os.cpu_count()} logical" + (f" ({usable} usable)" if usable else "")
    try:
        load1, load5, _ = os.getloadavg()
        loadavg = f"{load1:.2f} (1 min), {load5:.2f} (5 min)"
    except OSError:
        loadavg = "n/a"
    facts = {
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cores": cores,
        "load average": loadavg,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event loop": loop,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
    }
    width = max(map(len, facts))
    return "\n".join(f"{key:<{width}}  {value}" for key, value in facts.items())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float | int):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if _RATIO.search(key):
        return f"{value:.2f}x"
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text columns: text left-aligned, numbers right-aligned."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    cells = [[_cell(c, row.get(c, "")) for c in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(c), int | float) or row.get(c) in (None, "") for row in rows)
        for c in columns
    ]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def run_one(module: ModuleType) -> list[dict[str, Any]]:
    rows = module.run()
    if not isinstance(rows, list):
        raise TypeError(f"{module.__name__}.run() returned {type(rows).__name__}, not a list")
    return rows


def main(argv: Sequence[str]) -> int:
    available = discover()
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    print(machine_facts())
    failed = []
    for name in wanted:
        started = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if not callable(getattr(module, "run", None)):
                print(f"\n== {name}: skipped (no run() function)")
                continue
            title = getattr(module, "TITLE", "")
            print(f"\n== {name}" + (f": {title}" if title else ""), flush=True)
            rows = run_one(module)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            failed.append(name)
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(file=sys.stderr)
            continue
        print(format_table(rows))
        print(f"({time.monotonic() - started:.1f}s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
