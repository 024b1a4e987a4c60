"""Triton's inference statistics (``ModelStatistics`` RPC, ``GET /v2/models/{name}/stats``).

Answered from the API server's own counters (:class:`~anyserve.metrics.api.
ModelStats`): what requests this server routed took, receipt to answer, by
the KServe model name their capability answers to (capabilities sharing a
name are summed). Only ``success`` and ``fail`` are kept; the queue and
compute phases happen on replicas and are reported as zero here (the
replicas' ``/metrics`` have them). Each request is one inference and one
execution.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from anyserve._proto import grpc_predict_v2_pb2 as pb
from anyserve.errors import NotFound
from anyserve.metrics.api import ApiMetrics, ModelStats

_PHASES = ("queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss")


def _by_name(stats: list[ModelStats]) -> dict[str, list[ModelStats]]:
    grouped: dict[str, list[ModelStats]] = {}
    for s in stats:
        grouped.setdefault(s.name, []).append(s)
    return grouped


def model_statistics(
    metrics: ApiMetrics, name: str, version: str, served: Collection[str]
) -> pb.ModelStatisticsResponse:
    """The statistics of model ``name`` (every model with statistics when empty).

    A model that ``served`` names but no request reached yet gets zeros.
    Raises NotFound for a name neither served nor seen.
    """
    grouped = _by_name(metrics.model_stats(name))
    if name and not grouped:
        if name not in served:
            raise NotFound(f"no statistics for model {name!r}: no replica serves it")
        grouped[name] = []
    response = pb.ModelStatisticsResponse()
    for model, parts in sorted(grouped.items()):
        entry = response.model_stats.add(name=model, version=version)
        success = sum(p.success_count for p in parts)
        fail = sum(p.fail_count for p in parts)
        entry.last_inference = max((p.last_inference_ms for p in parts), default=0)
        entry.inference_count = entry.execution_count = success
        infer = entry.inference_stats
        infer.success.count, infer.success.ns = success, sum(p.success_ns for p in parts)
        infer.fail.count, infer.fail.ns = fail, sum(p.fail_ns for p in parts)
        for phase in _PHASES:
            getattr(infer, phase).SetInParent()  # present, zero: as Triton shows them
    return response


def _duration(d: pb.StatisticDuration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(response: pb.ModelStatisticsResponse) -> dict[str, Any]:
    """Triton's HTTP JSON form of ``response`` (numbers as numbers)."""
    models = []
    for m in response.model_stats:
        infer = m.inference_stats
        phases = {p: _duration(getattr(infer, p)) for p in ("success", "fail", *_PHASES)}
        models.append(
            {
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": phases,
                "batch_stats": [],
            }
        )
    return {"model_stats": models}
