"""Handler-defined metrics as a worker collects them (anyserve.metrics.worker)."""

from __future__ import annotations

import pytest

from anyserve._proto import worker_pb2 as wpb
from anyserve.metrics.worker import MAX_PENDING_OBSERVATIONS, HandlerMetrics


def test_changes_are_taken_once_and_batched() -> None:
    metrics = HandlerMetrics()
    tokens = metrics.counter("tokens", "Tokens.", ["model"])
    tokens.labels(model="a").inc(2)
    tokens.labels("a").inc()
    tokens.labels(model="b").inc()
    sizes = metrics.histogram("sizes", "Sizes.", buckets=[10, 1])
    sizes.observe(3)
    sizes.observe(30)
    updates = {(u.name, tuple(u.label_values)): u for u in metrics.take()}
    assert updates[("tokens_total", ("a",))].value == 3
    assert updates[("tokens_total", ("b",))].value == 1
    assert updates[("tokens_total", ("a",))].kind == wpb.MetricUpdate.COUNTER
    hist = updates[("sizes", ())]
    assert list(hist.observations) == [3, 30] and list(hist.buckets) == [1, 10]
    assert metrics.take() == []  # nothing changed since


def test_a_gauge_keeps_its_value_across_reports() -> None:
    metrics = HandlerMetrics()
    depth = metrics.gauge("depth", "Queue depth.")
    depth.set(5)
    assert metrics.take()[0].value == 5
    depth.inc(2)
    depth.dec()
    (update,) = metrics.take()
    assert update.kind == wpb.MetricUpdate.GAUGE and update.value == 6


def test_declaring_again_returns_the_same_metric_or_refuses() -> None:
    metrics = HandlerMetrics()
    metrics.counter("calls", "Calls.").inc()
    metrics.counter("calls_total", "Calls.").inc()  # the same, _total given
    assert metrics.take()[0].value == 2
    with pytest.raises(ValueError, match="another kind or labels"):
        metrics.gauge("calls_total", "Calls.")
    with pytest.raises(ValueError, match="another kind or labels"):
        metrics.counter("calls", "Calls.", ["kind"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: m.counter("bad name", "x"), "not a Prometheus name"),
        (lambda m: m.counter("ok", "x", ["bad-label"]), "label names"),
        (lambda m: m.counter("c1", "x").inc(-1), "only goes up"),
        (lambda m: m.counter("c2", "x").observe(1), "does not apply"),
        (lambda m: m.histogram("h", "x").set(1), "does not apply"),
        (lambda m: m.counter("c3", "x", ["k"]).inc(), "use .labels"),
        (lambda m: m.counter("c4", "x", ["k"]).labels("a", "b"), "takes labels"),
        (lambda m: m.counter("c5", "x", ["k"]).labels(j="a"), "takes labels"),
    ],
)
def test_mistakes_raise_value_error(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(HandlerMetrics())  # type: ignore[operator]


def test_pending_observations_are_bounded() -> None:
    metrics = HandlerMetrics()
    hist = metrics.histogram("many", "Many.")
    for i in range(MAX_PENDING_OBSERVATIONS + 5):
        hist.observe(i)
    (update,) = metrics.take()
    assert len(update.observations) == MAX_PENDING_OBSERVATIONS
    assert update.observations[0] == 5  # the oldest went first
