"""A replica's metrics from what its slots report (anyserve.metrics.replica)."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from anyserve._proto import worker_pb2 as wpb
from anyserve.capability import Capability
from anyserve.metrics.api import ApiMetrics
from anyserve.metrics.replica import ReplicaMetrics, WorkerRow

CAP = "type=echo"


def _samples(metrics: ReplicaMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _labels(**extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"handler": "echo", "capability": CAP, **extra}.items()))


def _metrics(rows: list[WorkerRow] | None = None) -> ReplicaMetrics:
    return ReplicaMetrics(lambda: rows or [], {"echo": CAP})


def test_calls_by_outcome_with_the_workers_figures() -> None:
    metrics = _metrics()
    ok = wpb.Header(end=wpb.End(), stats=wpb.CallStats(handler_seconds=0.2, credit_stalls=3))
    failed = wpb.Header(error=wpb.Error(code="handler_error"), stats=wpb.CallStats())
    metrics.call_ended("echo", ok)
    metrics.call_ended("echo", ok)
    metrics.call_ended("echo", failed)
    metrics.calls_ended("echo", "cancelled")
    metrics.calls_ended("echo", "unavailable", 0)  # nothing in flight: no series
    samples = _samples(metrics)
    assert samples[("anyserve_replica_calls_total", _labels(code="ok"))] == 2
    assert samples[("anyserve_replica_calls_total", _labels(code="handler_error"))] == 1
    assert samples[("anyserve_replica_calls_total", _labels(code="cancelled"))] == 1
    assert ("anyserve_replica_calls_total", _labels(code="unavailable")) not in samples
    assert samples[("anyserve_replica_handler_duration_seconds_count", _labels())] == 3
    assert samples[("anyserve_replica_credit_stalls_total", _labels())] == 6


def test_worker_rows_are_read_at_scrape_time() -> None:
    rows = [
        WorkerRow("echo", CAP, "ready", restarts=2, recycles=1, starts=4),
        WorkerRow("echo", CAP, "starting", restarts=1, recycles=0, starts=1),
    ]
    samples = _samples(_metrics(rows))
    assert samples[("anyserve_replica_workers", _labels(state="ready"))] == 1
    assert samples[("anyserve_replica_workers", _labels(state="starting"))] == 1
    assert samples[("anyserve_replica_workers", _labels(state="failed"))] == 0
    assert samples[("anyserve_replica_worker_restarts_total", _labels())] == 3
    assert samples[("anyserve_replica_worker_recycles_total", _labels())] == 1
    assert samples[("anyserve_replica_worker_starts_total", _labels())] == 5


def test_handler_metrics_are_exported_and_misfits_dropped() -> None:
    metrics = _metrics()
    count = wpb.MetricUpdate(
        kind=wpb.MetricUpdate.COUNTER,
        name="app_hits_total",
        documentation="Hits.",
        label_names=["page"],
        label_values=["home"],
        value=2,
    )
    gauge = wpb.MetricUpdate(kind=wpb.MetricUpdate.GAUGE, name="app_depth", value=7)
    hist = wpb.MetricUpdate(
        kind=wpb.MetricUpdate.HISTOGRAM, name="app_size", observations=[1, 50], buckets=[10]
    )
    clash = wpb.MetricUpdate(
        kind=wpb.MetricUpdate.COUNTER, name="app_hits_total", label_names=["other"], value=1
    )
    taken = wpb.MetricUpdate(
        kind=wpb.MetricUpdate.COUNTER, name="anyserve_replica_calls_total", value=1
    )
    metrics.apply([count, count, gauge, hist, clash, taken])
    samples = _samples(metrics)
    assert samples[("app_hits_total", (("page", "home"),))] == 4
    assert samples[("app_depth", ())] == 7
    assert samples[("app_size_bucket", (("le", "10.0"),))] == 1
    assert samples[("app_size_count", ())] == 2
    assert not any(
        name == "anyserve_replica_calls_total" and not labels for name, labels in samples
    )


def test_the_dashboard_and_readme_name_only_metrics_that_exist() -> None:
    api = ApiMetrics(lambda: (1, 1))
    api.observe(Capability(type="a"), "stream", 200, 0.1, first_chunk=0.05, chunks=2)
    api.decision("chosen")
    api.registration_failed()
    api.heartbeats_expired(1)
    replica = _metrics([WorkerRow("echo", CAP, "ready", 0, 0, 1)])
    replica.call_ended("echo", wpb.Header(end=wpb.End(), stats=wpb.CallStats(credit_stalls=1)))
    replica.waited("echo", 0.1)
    replica.worker_started("echo", 1.0)
    replica.worker_crashed("echo")
    exported = set()
    for registry in (api.registry, replica.registry):
        text = generate_latest(registry).decode()
        exported |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    root = Path(__file__).resolve().parents[2]
    dashboard = (root / "deploy/grafana/anyserve.json").read_text()
    used = set(re.findall(r"anyserve_[a-z_]+", dashboard))
    assert used and used <= exported, used - exported
    readme = (root / "README.md").read_text()
    documented = set(re.findall(r"`(anyserve_(?:api|replica)_[a-z_]+)", readme))
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in exported}
    assert documented and documented <= exported | families, documented - exported - families
