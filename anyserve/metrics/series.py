"""Plain-Python counters and histograms, rendered by prometheus-client at scrape time.

prometheus-client's own metric objects take a lock and check their state on
every update (a few microseconds each, several per request). The request path
runs on one event loop thread, so these keep bare numbers instead, and a
:class:`~prometheus_client.registry.Collector` turns them into metric families
only when Prometheus scrapes. Only for code that updates them from one thread.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily


class Hist:
    """A histogram's buckets (``le`` bounds, ascending), count and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in the first bucket whose bound is >= it."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as the exposition format wants them."""
        pairs, total = [], 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            pairs.append((bound, float(total)))
        return pairs


def _le(bound: float) -> str:
    # As prometheus-client renders its own buckets: 1 -> "1.0".
    return repr(float(bound))


def counter_family(
    name: str, doc: str, labels: Sequence[str], values: Iterable[tuple[Sequence[str], float]]
) -> CounterMetricFamily:
    """A counter family (``name`` without ``_total``) from ``(label values, count)``."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def histogram_family(
    name: str, doc: str, labels: Sequence[str], values: Iterable[tuple[Sequence[str], Hist]]
) -> HistogramMetricFamily:
    """A histogram family from ``(label values, Hist)`` pairs."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    for label_values, hist in values:
        family.add_metric(list(label_values), hist.cumulative(), hist.sum)
    return family
