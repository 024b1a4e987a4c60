"""A replica's metrics: calls, workers and handler-defined metrics.

:class:`ReplicaMetrics` is told what happens by the replica's slots (a call's
last frame carries the worker's :class:`~anyserve._proto.worker_pb2.CallStats`;
crashes, cancels, cold starts) and by the manager (the wait for a worker);
worker states, restarts and recycles are read from the slots at scrape time
(``rows``), so they cost nothing between scrapes. Labels: ``handler`` (the
handler's name), ``capability`` (its canonical string), ``state`` and
``code`` (``ok``, an anyserve error type such as ``handler_error``, or
``cancelled``), all bounded by the app's declaration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from anyserve._proto import worker_pb2 as wpb
from anyserve.metrics.api import LATENCY_BUCKETS
from anyserve.metrics.series import Hist, counter_family, histogram_family
from anyserve.metrics.worker import OBJECTS_CREATED, OBJECTS_FETCHED, OBJECTS_READ
from anyserve.objects.sweeper import SweepReport

log = logging.getLogger("anyserve.metrics")

#: Worker states exported (every one, 0 included, so a dashboard's series exist).
STATES = ("starting", "ready", "draining", "stopped", "failed")
COLD_START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class SlotObserver(Protocol):
    """What a replica's slots and manager tell its metrics (``ReplicaMetrics`` is one)."""

    def call_ended(self, name: str, header: wpb.Header) -> None: ...
    def calls_ended(self, name: str, code: str, count: int = 1) -> None: ...
    def worker_started(self, name: str, seconds: float) -> None: ...
    def worker_crashed(self, name: str) -> None: ...
    def waited(self, name: str, seconds: float) -> None: ...
    def delegated(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One slot as the scrape sees it."""

    handler: str
    capability: str
    state: str
    restarts: int
    recycles: int
    starts: int


Rows = Callable[[], Iterable[WorkerRow]]


class _Workers(Collector):
    def __init__(self, rows: Rows) -> None:
        self._rows = rows

    def collect(self) -> Iterable[Metric]:
        states = GaugeMetricFamily(
            "anyserve_replica_workers",
            "Worker slots by handler and state.",
            labels=("handler", "capability", "state"),
        )
        restarts = CounterMetricFamily(
            "anyserve_replica_worker_restarts",
            "Worker processes restarted after a crash.",
            labels=("handler", "capability"),
        )
        recycles = CounterMetricFamily(
            "anyserve_replica_worker_recycles",
            "Worker processes replaced on purpose (a stuck call, too much memory).",
            labels=("handler", "capability"),
        )
        starts = CounterMetricFamily(
            "anyserve_replica_worker_starts",
            "Worker processes that started (said hello).",
            labels=("handler", "capability"),
        )
        counts: dict[tuple[str, str], dict[str, int]] = {}
        totals: dict[tuple[str, str], list[int]] = {}
        for row in self._rows():
            key = (row.handler, row.capability)
            by_state = counts.setdefault(key, dict.fromkeys(STATES, 0))
            by_state[row.state] = by_state.get(row.state, 0) + 1
            total = totals.setdefault(key, [0, 0, 0])
            total[0] += row.restarts
            total[1] += row.recycles
            total[2] += row.starts
        for key, by_state in counts.items():
            for state, count in by_state.items():
                states.add_metric([*key, state], count)
            restarts.add_metric(list(key), totals[key][0])
            recycles.add_metric(list(key), totals[key][1])
            starts.add_metric(list(key), totals[key][2])
        yield from (states, restarts, recycles, starts)


class _Handler:
    """The figures of one handler: plain numbers (see series.py)."""

    __slots__ = ("codes", "cold_start", "crashes", "duration", "queue_wait", "stalls")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.duration = Hist(LATENCY_BUCKETS)
        self.queue_wait = Hist(LATENCY_BUCKETS)
        self.cold_start = Hist(COLD_START_BUCKETS)
        self.stalls = 0
        self.crashes = 0


class _Calls(Collector):
    def __init__(self, metrics: ReplicaMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        rows = [((name, m.capability(name)), h) for name, h in m.handlers.items()]
        labels = ("handler", "capability")
        yield counter_family(
            "anyserve_replica_calls",
            "Calls ended, by handler and outcome (ok, an error type, cancelled).",
            (*labels, "code"),
            (((*key, code), n) for key, h in rows for code, n in h.codes.items()),
        )
        for name, doc, attr in (
            (
                "anyserve_replica_handler_duration_seconds",
                "Time a call spent in its worker (measured there), arrival to answer.",
                "duration",
            ),
            (
                "anyserve_replica_queue_wait_seconds",
                "Time a call waited for a worker to take it (a free one, or a cold start).",
                "queue_wait",
            ),
            (
                "anyserve_replica_worker_cold_start_seconds",
                "Time from a worker process's spawn to its hello (the app's import).",
                "cold_start",
            ),
        ):
            yield histogram_family(name, doc, labels, ((k, getattr(h, attr)) for k, h in rows))
        yield counter_family(
            "anyserve_replica_credit_stalls",
            "Times a stream's handler waited for credit: a slow client held it back.",
            labels,
            ((key, h.stalls) for key, h in rows),
        )
        yield counter_family(
            "anyserve_replica_worker_crashes",
            "Worker processes that ended while wanted (crashed or killed).",
            labels,
            ((key, h.crashes) for key, h in rows),
        )
        yield counter_family(
            "anyserve_replica_delegations",
            "Calls this replica could not take and sent back through the API server.",
            (),
            [((), m.delegations)],
        )


class _Objects(Collector):
    """The object store: what workers counted and what the sweeper found."""

    def __init__(self, metrics: ReplicaMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._metrics
        for name, doc in (
            (OBJECTS_CREATED, "Objects created by this replica's handlers."),
            (OBJECTS_READ, "Objects read by this replica's handlers (reads that found one)."),
            (OBJECTS_FETCHED, "Objects fetched from a peer replica's store into this one."),
        ):
            yield counter_family(name.removesuffix("_total"), doc, (), [((), m.objects[name])])
        yield counter_family(
            "anyserve_replica_objects_expired",
            "Objects removed by this replica's sweeper once their TTL had passed.",
            (),
            [((), m.objects_expired)],
        )
        last = m.last_sweep
        for name, doc, figure in (
            ("anyserve_replica_objects", "Objects in the store directory (last sweep).", "objects"),
            (
                "anyserve_replica_object_store_bytes",
                "Bytes of the objects in the store directory (last sweep).",
                "bytes",
            ),
        ):
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], getattr(last, figure))
            yield gauge


class ReplicaMetrics:
    """Every metric of one replica, exported through its own ``registry``.
    ``rows`` lists the worker slots at scrape time; ``capabilities`` maps
    handler names to their capability's canonical string. Updates are plain
    arithmetic (``series.py``): use it from the replica's event loop only."""

    def __init__(self, rows: Rows, capabilities: dict[str, str]) -> None:
        self._capabilities = capabilities
        self.handlers: dict[str, _Handler] = {}
        self.delegations = 0
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Calls(self))
        self.registry.register(_Workers(rows))
        #: Object-store figures: the workers' counts, the sweeper's last pass.
        self.objects = dict.fromkeys((OBJECTS_CREATED, OBJECTS_READ, OBJECTS_FETCHED), 0.0)
        self.objects_expired = 0
        self.last_sweep = SweepReport()
        self.registry.register(_Objects(self))  # auto_describe collects once: after those
        #: What handlers define (context.metrics): exported with the replica's.
        self._user: dict[str, Counter | Gauge | Histogram] = {}
        self._user_bad: set[str] = set()

    def capability(self, name: str) -> str:
        """The canonical capability string of handler ``name``."""
        return self._capabilities.get(name, "")

    def handler(self, name: str) -> _Handler:
        """The figures of handler ``name``, made on first use."""
        found = self.handlers.get(name)
        if found is None:
            found = self.handlers[name] = _Handler()
        return found

    # -- told by the slots and the manager ---------------------------------------

    def call_ended(self, name: str, header: wpb.Header) -> None:
        """A call's last frame (End or Error, carrying CallStats) arrived."""
        code = (header.error.code or "error") if header.HasField("error") else "ok"
        figures = self.handler(name)
        figures.codes[code] = figures.codes.get(code, 0) + 1
        stats = header.stats
        figures.duration.observe(stats.handler_seconds)
        figures.stalls += stats.credit_stalls
        if stats.metrics:
            self.apply(stats.metrics)

    def calls_ended(self, name: str, code: str, count: int = 1) -> None:
        """Calls that ended without a last frame (``cancelled``, ``unavailable``)."""
        if count:
            codes = self.handler(name).codes
            codes[code] = codes.get(code, 0) + count

    def waited(self, name: str, seconds: float) -> None:
        """A call waited ``seconds`` for a worker of handler ``name``."""
        self.handler(name).queue_wait.observe(seconds)

    def worker_started(self, name: str, seconds: float) -> None:
        """A worker of ``name`` said hello ``seconds`` after it was spawned."""
        self.handler(name).cold_start.observe(seconds)

    def worker_crashed(self, name: str) -> None:
        """A wanted worker of ``name`` ended."""
        self.handler(name).crashes += 1

    def delegated(self) -> None:
        """A call was sent back through the API server."""
        self.delegations += 1

    def swept(self, report: SweepReport) -> None:
        """The object store's sweeper finished a pass (its ``on_sweep``)."""
        self.objects_expired += report.expired
        self.last_sweep = report

    # -- handler-defined metrics -------------------------------------------------

    def apply(self, updates: Iterable[wpb.MetricUpdate]) -> None:
        """Apply handler-defined metric updates. An update that does not fit
        (a name declared with another kind or labels by another handler, a name
        taken by anyserve's own) is logged once and dropped."""
        objects = self.objects
        for update in updates:
            if update.name in objects and not update.label_names:  # the store's counts
                objects[update.name] += update.value
                continue
            try:
                metric = self._user_metric(update)
                child = metric.labels(*update.label_values) if update.label_names else metric
                if update.kind == wpb.MetricUpdate.COUNTER:
                    assert isinstance(child, Counter)
                    child.inc(update.value)
                elif update.kind == wpb.MetricUpdate.GAUGE:
                    assert isinstance(child, Gauge)
                    child.set(update.value)
                else:
                    assert isinstance(child, Histogram)
                    for value in update.observations:
                        child.observe(value)
            except (ValueError, AssertionError) as exc:
                if update.name not in self._user_bad:
                    self._user_bad.add(update.name)
                    log.warning("handler metric %s dropped: %s", update.name, exc)

    def _user_metric(self, update: wpb.MetricUpdate) -> Counter | Gauge | Histogram:
        metric = self._user.get(update.name)
        labels = tuple(update.label_names)
        if metric is not None:
            if tuple(metric._labelnames) != labels:
                raise ValueError(f"declared with labels {list(metric._labelnames)} elsewhere")
            return metric
        reg, doc = self.registry, update.documentation or update.name
        made: Counter | Gauge | Histogram
        if update.kind == wpb.MetricUpdate.COUNTER:
            made = Counter(update.name, doc, labels, registry=reg)
        elif update.kind == wpb.MetricUpdate.GAUGE:
            made = Gauge(update.name, doc, labels, registry=reg, multiprocess_mode="mostrecent")
        else:
            buckets = tuple(update.buckets) or LATENCY_BUCKETS
            made = Histogram(update.name, doc, labels, buckets=buckets, registry=reg)
        self._user[update.name] = made
        return made
