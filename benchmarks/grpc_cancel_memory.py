"""Does cancelling in-flight grpc.aio calls grow the process? A bare probe.

``python -m benchmarks.grpc_cancel_memory [MODE] [N]`` runs a grpc.aio echo
server and client in one process, warms up with 2,000 calls, makes ``N``
calls (default 20,000) of one kind, waits for the server's handlers to end,
and prints how much the resident size grew:

* ``plain``: calls that complete;
* ``cancel``: calls cancelled while the server still runs them (``call.cancel()``),
  as the API server cancels a replica call when its HTTP client goes away;
* ``task``: the same through cancelling the task awaiting the call;
* ``core``: the call cancelled in gRPC's core only (its task left to finish).

On grpcio 1.85.3 (and 1.70) ``plain`` grows by ~0.1 MiB and ``cancel`` by
tens of MiB (~1-3 KB a call), which matches a soak of client disconnects
(``python -m benchmarks.soak --skip ...`` leaving only ``unary_left``)
growing the API server. ``core`` still grows here: the server side of a
cancelled call leaks too, which is why the API server asks replicas to end
calls instead (anyserve/api_server/abandoned.py). Not part of ``make bench``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys

import grpc
import grpc.aio

MODES = ("plain", "cancel", "task", "core")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


async def _handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"slow":
        await asyncio.sleep(0.05)
    return request


async def probe(mode: str, n: int) -> float:
    """Resident MiB grown by ``n`` calls of ``mode`` (after a warm-up)."""
    server = grpc.aio.server()
    method = grpc.unary_unary_rpc_method_handler(_handler)
    handlers = grpc.method_handlers_generic_handler("probe.S", {"M": method})
    server.add_generic_rpc_handlers([handlers])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call_m = channel.unary_unary("/probe.S/M")
            for _ in range(2000):
                await call_m(b"x")
            start = _rss_mib()
            for _ in range(n):
                if mode == "plain":
                    await call_m(b"x", timeout=5)
                elif mode == "cancel":
                    call = call_m(b"slow", timeout=5)
                    await asyncio.sleep(0)
                    call.cancel()
                    # Our own cancel of that call (this task is not cancelled).
                    with contextlib.suppress(asyncio.CancelledError):
                        await call
                elif mode == "core":
                    call = call_m(b"slow", timeout=5)
                    await asyncio.sleep(0)
                    grpc.aio._call.Call.cancel(call)
                    with contextlib.suppress(asyncio.CancelledError):
                        await call
                else:
                    task = asyncio.ensure_future(call_m(b"slow", timeout=5))
                    await asyncio.sleep(0.0005)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):  # that task's, not ours
                        await task
            await asyncio.sleep(1.0)  # every handler has ended
            gc.collect()
            return _rss_mib() - start
    finally:
        await server.stop(None)


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "cancel"
    n = int(argv[1]) if len(argv) > 1 else 20_000
    if mode not in MODES:
        print(f"MODE is one of {', '.join(MODES)}", file=sys.stderr)
        return 2
    grew = asyncio.run(probe(mode, n))
    print(f"grpcio {grpc.__version__}: {n} {mode} calls grew the process by {grew:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
