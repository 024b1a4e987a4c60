"""``python -m anyserve.api_server --port 8080`` (the seed's command).

:func:`parse_args` turns the command line into an :class:`ApiServerConfig`
(other front ends reuse it), :func:`run` serves a config until a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
from collections.abc import Sequence

from anyserve.api_server.config import MIB, NO_MATCH_POLICIES, ApiServerConfig
from anyserve.api_server.server import serve


def build_parser() -> argparse.ArgumentParser:
    """The API server's options (also shown by ``--help``)."""
    defaults = ApiServerConfig(token=None)
    p = argparse.ArgumentParser(
        prog="python -m anyserve.api_server",
        description="anyserve API server: capability routing over HTTP/SSE and gRPC.",
    )
    p.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=defaults.port, help="HTTP port (default %(default)s)"
    )
    p.add_argument(
        "--grpc-port", type=int, default=defaults.grpc_port, help="gRPC port (0 = any free port)"
    )
    p.add_argument(
        "--no-match",
        choices=NO_MATCH_POLICIES,
        default=defaults.no_match,
        help="when no replica matches: 404, or forward to a random replica (default %(default)s)",
    )
    p.add_argument("--token", default=None, help="token required by /register (or $ANYSERVE_TOKEN)")
    p.add_argument("--hop-limit", type=int, default=defaults.hop_limit, help="delegation hop limit")
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=defaults.heartbeat_interval,
        help="seconds between replica heartbeats (replicas expire after 3 missed)",
    )
    p.add_argument(
        "--ttl", type=float, default=None, help="seconds before a silent replica expires"
    )
    p.add_argument(
        "--max-body-mib", type=int, default=defaults.max_body // MIB, help="HTTP body limit in MiB"
    )
    p.add_argument(
        "--max-inflight",
        type=int,
        default=defaults.max_inflight_per_replica,
        help="requests in flight per replica before answering 429",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=defaults.request_timeout,
        help="deadline in seconds for requests that set none",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (debug explains every routing decision)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[ApiServerConfig, str]:
    """Parse the command line; returns ``(config, log level)``. Exits on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ApiServerConfig(
            host=args.host,
            port=args.port,
            grpc_port=args.grpc_port,
            no_match=args.no_match,
            hop_limit=args.hop_limit,
            heartbeat_interval=args.heartbeat_interval,
            ttl=args.ttl,
            max_body=args.max_body_mib * MIB,
            max_inflight_per_replica=args.max_inflight,
            request_timeout=args.request_timeout,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.token:
        config.token = args.token
    return config, args.log_level


def run(config: ApiServerConfig) -> None:
    """Serve ``config`` until SIGINT/SIGTERM, on uvloop when it is installed."""
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    else:
        asyncio.run(serve(config))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m anyserve.api_server``."""
    config, level = parse_args(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(config)


if __name__ == "__main__":
    main()
