"""Handler-defined metrics (``context.metrics``), as a worker process collects them.

A handler declares a metric and updates it; the worker keeps only the changes
since it last reported and sends them with the next call's End or Error frame
(:class:`~anyserve._proto.worker_pb2.CallStats`), and the replica exports them
on its ``/metrics`` (:mod:`anyserve.metrics.replica`). So a metric costs the
handler a lock and a dictionary update, and nothing travels unless it changed.

    tokens = context.metrics.counter("tokens_total", "Tokens generated.", ["model"])
    tokens.labels(model="small").inc(12)
    context.metrics.histogram("prompt_chars", "Prompt sizes.", buckets=[10, 100, 1000]).observe(42)

Names follow Prometheus rules (``[a-zA-Z_:][a-zA-Z0-9_:]*``); a counter's
exported name ends with ``_total``. Declaring a name again returns the same
metric when kind and labels agree, else raises ValueError. Safe from sync
handlers' threads.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence

from anyserve._proto import worker_pb2 as wpb

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Observations kept for one histogram series between two reports: beyond, the
# oldest are dropped (a report goes with every call's answer, so only a handler
# observing thousands of values per call gets near it).
MAX_PENDING_OBSERVATIONS = 10_000

Kind = wpb.MetricUpdate.Kind
_Key = tuple[str, tuple[str, ...]]


class _Declared:
    __slots__ = ("buckets", "doc", "kind", "labels", "name")

    def __init__(
        self, kind: Kind, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.kind, self.name, self.doc, self.labels, self.buckets = (
            kind,
            name,
            doc,
            labels,
            buckets,
        )


class HandlerMetrics:
    """The metrics of one worker process; ``context.metrics`` is this process's one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._declared: dict[str, _Declared] = {}
        self._counts: dict[_Key, float] = {}
        self._gauges: dict[_Key, float] = {}  # set since the last report
        self._gauge_now: dict[_Key, float] = {}  # every gauge's value
        self._observed: dict[_Key, list[float]] = {}

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Metric:
        """A counter (``inc``); exported as ``name`` with ``_total`` added if missing."""
        return self._declare(wpb.MetricUpdate.COUNTER, name, documentation, labels, ())

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Metric:
        """A gauge (``set``, ``inc``, ``dec``): the last value set in any worker
        of the handler wins."""
        return self._declare(wpb.MetricUpdate.GAUGE, name, documentation, labels, ())

    def histogram(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Metric:
        """A histogram (``observe``) with these bucket bounds."""
        bounds = tuple(sorted(float(b) for b in buckets))
        return self._declare(wpb.MetricUpdate.HISTOGRAM, name, documentation, labels, bounds)

    def _declare(
        self,
        kind: Kind,
        name: str,
        doc: str,
        labels: Sequence[str],
        buckets: tuple[float, ...],
    ) -> Metric:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a Prometheus name")
        bad = [label for label in labels if not _LABEL.match(label)]
        if bad:
            raise ValueError(f"metric {name!r}: label names {bad} are not Prometheus names")
        if kind == wpb.MetricUpdate.COUNTER and not name.endswith("_total"):
            name += "_total"
        declared = _Declared(kind, name, doc, tuple(labels), buckets)
        with self._lock:
            known = self._declared.setdefault(name, declared)
        if (known.kind, known.labels, known.buckets) != (kind, declared.labels, buckets):
            raise ValueError(f"metric {name!r} was declared before with another kind or labels")
        return Metric(self, known, ())

    def _update(self, metric: _Declared, values: tuple[str, ...], op: str, amount: float) -> None:
        key = (metric.name, values)
        with self._lock:
            if op == "inc":
                self._counts[key] = self._counts.get(key, 0.0) + amount
            elif op == "set":
                self._gauges[key] = self._gauge_now[key] = amount
            else:
                pending = self._observed.setdefault(key, [])
                if len(pending) >= MAX_PENDING_OBSERVATIONS:
                    del pending[0]
                pending.append(amount)

    def _gauge_value(self, key: _Key) -> float:
        with self._lock:
            return self._gauge_now.get(key, 0.0)

    def take(self) -> list[wpb.MetricUpdate]:
        """The changes since the last call (and forget them), the object store's
        counts (:data:`OBJECT_COUNTS`) included; [] when none."""
        if not (self._counts or self._gauges or self._observed):
            return OBJECT_COUNTS.take()  # the common case, without the lock
        with self._lock:
            counts, self._counts = self._counts, {}
            gauges, self._gauges = self._gauges, {}
            observed, self._observed = self._observed, {}
            declared = dict(self._declared)
        updates = []
        for table, kind in ((counts, "value"), (gauges, "value"), (observed, "observations")):
            for (name, values), change in table.items():
                d = declared[name]
                update = wpb.MetricUpdate(
                    kind=d.kind,
                    name=name,
                    documentation=d.doc,
                    label_names=d.labels,
                    label_values=values,
                    buckets=d.buckets,
                )
                if kind == "value":
                    assert isinstance(change, float)
                    update.value = change
                else:
                    assert isinstance(change, list)
                    update.observations.extend(change)
                updates.append(update)
        updates.extend(OBJECT_COUNTS.take())
        return updates


class Metric:
    """A declared metric, or one labelled series of it (see :meth:`labels`)."""

    __slots__ = ("_declared", "_owner", "_values")

    def __init__(self, owner: HandlerMetrics, declared: _Declared, values: tuple[str, ...]) -> None:
        self._owner = owner
        self._declared = declared
        self._values = values

    def labels(self, *values: str, **named: str) -> Metric:
        """The series of these label values (positional, or by name; all of them)."""
        names = self._declared.labels
        if named:
            if values or set(named) != set(names):
                raise ValueError(f"metric {self._declared.name!r} takes labels {list(names)}")
            values = tuple(str(named[n]) for n in names)
        if len(values) != len(names):
            raise ValueError(f"metric {self._declared.name!r} takes labels {list(names)}")
        return Metric(self._owner, self._declared, tuple(str(v) for v in values))

    def _check(self, kind: Kind, op: str) -> None:
        if self._declared.kind != kind:
            raise ValueError(f"{op}() does not apply to metric {self._declared.name!r}")
        if len(self._values) != len(self._declared.labels):
            raise ValueError(f"metric {self._declared.name!r} has labels: use .labels(...) first")

    def inc(self, amount: float = 1.0) -> None:
        """Counter (or gauge): add ``amount`` (a counter's must not be negative)."""
        if self._declared.kind == wpb.MetricUpdate.GAUGE:
            self.set(self._owner._gauge_value((self._declared.name, self._values)) + amount)
            return
        self._check(wpb.MetricUpdate.COUNTER, "inc")
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._owner._update(self._declared, self._values, "inc", float(amount))

    def dec(self, amount: float = 1.0) -> None:
        """Gauge: subtract ``amount``."""
        self.inc(-amount)

    def set(self, value: float) -> None:
        """Gauge: set the value."""
        self._check(wpb.MetricUpdate.GAUGE, "set")
        self._owner._update(self._declared, self._values, "set", float(value))

    def observe(self, value: float) -> None:
        """Histogram: record one value."""
        self._check(wpb.MetricUpdate.HISTOGRAM, "observe")
        self._owner._update(self._declared, self._values, "observe", float(value))


#: The object-store counters a worker ships (the replica exports them as its own).
OBJECTS_CREATED = "anyserve_replica_objects_created_total"
OBJECTS_READ = "anyserve_replica_objects_read_total"
OBJECTS_FETCHED = "anyserve_replica_objects_fetched_total"


class ObjectCounts:
    """What this process's object stores did: objects ``created``, ``read`` (a ``get``
    that found the object) and ``fetched`` from a peer replica.

    The store bumps these plain integers (on the event loop thread, where every store
    operation runs); :meth:`take` turns what changed since its last call into counter
    updates that travel with handler metrics, so they cost nothing when unchanged.
    """

    __slots__ = ("_sent", "created", "fetched", "read")

    def __init__(self) -> None:
        self.created = self.read = self.fetched = 0
        self._sent = (0, 0, 0)

    def take(self) -> list[wpb.MetricUpdate]:
        """Counter updates for what changed since the last call; [] when nothing did."""
        now = (self.created, self.read, self.fetched)
        if now == self._sent:
            return []
        sent, self._sent = self._sent, now
        return [
            wpb.MetricUpdate(kind=wpb.MetricUpdate.COUNTER, name=name, value=float(n - before))
            for name, n, before in zip(
                (OBJECTS_CREATED, OBJECTS_READ, OBJECTS_FETCHED), now, sent, strict=True
            )
            if n != before
        ]


#: This process's object-store counts (see :class:`ObjectCounts`).
OBJECT_COUNTS = ObjectCounts()

#: This process's handler metrics (one worker process serves one handler).
HANDLER_METRICS = HandlerMetrics()
