"""The API server's metrics, and the per-capability counters behind Triton's statistics.

One :class:`ApiMetrics` per server. Requests are labelled by ``capability``
(the canonical string of the capability the chosen replica serves them with,
``unmatched`` when no replica was chosen), ``endpoint`` (one of
:data:`ENDPOINTS`) and ``code`` (the HTTP status; a gRPC call is counted under
the HTTP status of its error, 200 when it succeeded). A client cannot make a
new label value: capabilities come from registrations, not from requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from anyserve.capability import Capability
from anyserve.metrics.series import Hist, counter_family, histogram_family

#: The capability label of a request no replica was chosen for (no match, bad input).
UNMATCHED = "unmatched"
#: The endpoint kinds requests are counted under.
ENDPOINTS = ("infer", "stream", "generate", "openai", "grpc")
#: Routing decisions counted by ``anyserve_api_routing_decisions_total``.
DECISIONS = ("chosen", "no_match", "delegated", "retried")

# Latency buckets (seconds): from a cached echo (1 ms) to a long generation (2 min).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
CHUNK_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

#: What reports the registry's size at scrape time: (live replicas, distinct capabilities).
Census = Callable[[], tuple[int, int]]


def capability_label(cap: Capability | None) -> str:
    """The label value of a capability: its canonical string, or ``unmatched``."""
    return UNMATCHED if cap is None else str(cap)


@dataclass(slots=True)
class ModelStats:
    """Triton's inference statistics of one capability, in this server's view.

    ``*_ns`` are cumulative request durations (receipt to answer) in nanoseconds;
    ``last_inference_ms`` is the wall clock of the last request's end.
    """

    capability: Capability
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    @property
    def name(self) -> str:
        """The KServe model name the capability answers to."""
        return self.capability.name


class _Children:
    """The figures of one (capability, endpoint): plain numbers (see series.py)."""

    __slots__ = ("chunks", "codes", "duration", "first_chunk", "req_bytes", "resp_bytes")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.duration = Hist(LATENCY_BUCKETS)
        self.first_chunk = Hist(LATENCY_BUCKETS)
        self.chunks = Hist(CHUNK_BUCKETS)
        self.req_bytes = 0
        self.resp_bytes = 0


class _Collector(Collector):
    def __init__(self, metrics: ApiMetrics, census: Census | None) -> None:
        self._metrics = metrics
        self._census = census

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        rows = [((capability_label(cap), kind), c) for (cap, kind), c in m._children.items()]
        labels = ("capability", "endpoint")
        yield counter_family(
            "anyserve_api_requests",
            "Inference requests answered, by capability, endpoint kind and HTTP status.",
            (*labels, "code"),
            (((*key, str(code)), n) for key, c in rows for code, n in c.codes.items()),
        )
        yield histogram_family(
            "anyserve_api_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (a stream's last event).",
            labels,
            ((key, c.duration) for key, c in rows),
        )
        # Only the series that had streams: a unary endpoint shows no empty TTFC.
        streams = [(key, c) for key, c in rows if any(c.chunks.counts)]
        yield histogram_family(
            "anyserve_api_time_to_first_chunk_seconds",
            "Streams: time from a request's arrival to its first event.",
            labels,
            ((key, c.first_chunk) for key, c in streams),
        )
        yield histogram_family(
            "anyserve_api_stream_chunks",
            "Streams: responses relayed per stream.",
            labels,
            ((key, c.chunks) for key, c in streams),
        )
        yield counter_family(
            "anyserve_api_request_body_bytes",
            "Bytes of request bodies received (gRPC: serialized requests).",
            labels,
            ((key, c.req_bytes) for key, c in rows),
        )
        yield counter_family(
            "anyserve_api_response_body_bytes",
            "Bytes of response bodies sent (gRPC: serialized responses).",
            labels,
            ((key, c.resp_bytes) for key, c in rows),
        )
        yield GaugeMetricFamily(
            "anyserve_api_requests_in_flight", "Inference requests being served now.", m.in_flight
        )
        yield counter_family(
            "anyserve_api_routing_decisions",
            "Routing decisions: chosen (a replica leased), no_match, delegated (a request a"
            " replica handed back), retried (a replica unreachable, another tried).",
            ("decision",),
            (((d,), n) for d, n in m.decisions.items()),
        )
        yield counter_family(
            "anyserve_api_registration_failures",
            "POST /register (registrations and heartbeats) refused.",
            (),
            [((), m.registration_failures)],
        )
        yield counter_family(
            "anyserve_api_heartbeat_expiries",
            "Replicas dropped because their heartbeats stopped.",
            (),
            [((), m.heartbeat_expiries)],
        )
        if self._census is not None:
            replicas, capabilities = self._census()
            yield GaugeMetricFamily(
                "anyserve_api_replicas_registered",
                "Live replicas in this server's registry.",
                replicas,
            )
            yield GaugeMetricFamily(
                "anyserve_api_capabilities_served",
                "Distinct capabilities the live replicas serve (loaded or loadable).",
                capabilities,
            )


class ApiMetrics:
    """Every metric of one API server, exported through its own ``registry``.

    Updates are plain arithmetic, rendered at scrape time (``series.py``): use
    it from the server's event loop only. ``census`` is asked at scrape time
    for the registry's size, so registering replicas costs nothing here.
    """

    def __init__(self, census: Census | None = None) -> None:
        #: Inference requests being served now, HTTP and gRPC (the HTTP
        #: middleware and the gRPC entry keep it).
        self.in_flight = 0
        self.decisions = dict.fromkeys(DECISIONS, 0)
        self.registration_failures = 0
        self.heartbeat_expiries = 0
        self._children: dict[tuple[Capability | None, str], _Children] = {}
        #: Triton statistics by capability (the same observations as the metrics).
        self.stats: dict[Capability, ModelStats] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self, census))

    def children(self, cap: Capability | None, endpoint: str) -> _Children:
        """The figures of ``(cap, endpoint)``, made on first use."""
        key = (cap, endpoint)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = _Children()
        return found

    def observe(
        self,
        cap: Capability | None,
        endpoint: str,
        status: int,
        seconds: float,
        *,
        request_bytes: int = 0,
        response_bytes: int = 0,
        first_chunk: float | None = None,
        chunks: int | None = None,
    ) -> None:
        """Record one finished request. ``first_chunk`` (seconds after arrival)
        and ``chunks`` are given for streams only."""
        children = self.children(cap, endpoint)
        codes = children.codes
        codes[status] = codes.get(status, 0) + 1
        children.duration.observe(seconds)
        children.req_bytes += request_bytes
        children.resp_bytes += response_bytes
        if first_chunk is not None:
            children.first_chunk.observe(first_chunk)
        if chunks is not None:
            children.chunks.observe(chunks)
        if cap is not None:
            stats = self.stats.get(cap)
            if stats is None:
                stats = self.stats[cap] = ModelStats(cap)
            if status < 400:
                stats.success_count += 1
                stats.success_ns += int(seconds * 1e9)
            else:
                stats.fail_count += 1
                stats.fail_ns += int(seconds * 1e9)
            stats.last_inference_ms = int(time.time() * 1000)

    def decision(self, kind: str) -> None:
        """Count one routing decision (one of :data:`DECISIONS`)."""
        self.decisions[kind] += 1

    def registration_failed(self) -> None:
        """Count a refused ``/register``."""
        self.registration_failures += 1

    def heartbeats_expired(self, count: int) -> None:
        """Count replicas dropped for missed heartbeats."""
        self.heartbeat_expiries += count

    def model_stats(self, name: str = "") -> list[ModelStats]:
        """The statistics of every capability answering to KServe model ``name``
        (every capability when ``name`` is empty), by name."""
        found = [s for s in self.stats.values() if not name or s.name == name]
        return sorted(found, key=lambda s: (s.name, str(s.capability)))
