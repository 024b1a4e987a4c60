"""The API server's metrics, Triton statistics and log formats, without servers."""

from __future__ import annotations

import json
import logging

import pytest

from anyserve.capability import Capability
from anyserve.errors import NotFound
from anyserve.logs import JsonFormatter, TextFormatter, formatter
from anyserve.metrics.api import ApiMetrics, capability_label
from anyserve.metrics.http import endpoint_of
from anyserve.metrics.stats import model_statistics, statistics_json

CHAT = Capability(model="llama", type="chat")
EMBED = Capability(model="llama", type="embed")


def test_children_are_cached_per_capability_and_endpoint() -> None:
    metrics = ApiMetrics()
    assert metrics.children(CHAT, "infer") is metrics.children(Capability(CHAT), "infer")
    assert metrics.children(CHAT, "infer") is not metrics.children(CHAT, "grpc")
    assert capability_label(None) == "unmatched"
    assert capability_label(CHAT) == "model=llama,type=chat"


def test_statistics_sum_the_capabilities_of_a_name() -> None:
    metrics = ApiMetrics()
    metrics.observe(CHAT, "infer", 200, 0.5)
    metrics.observe(EMBED, "grpc", 200, 0.25)
    metrics.observe(CHAT, "infer", 503, 1.0)
    metrics.observe(None, "infer", 404, 0.1)  # no capability: not a model's
    (model,) = model_statistics(metrics, "llama", "", {"llama"}).model_stats
    assert model.inference_stats.success.count == 2
    assert model.inference_stats.success.ns == 750_000_000
    assert model.inference_stats.fail.count == 1
    assert model.inference_count == model.execution_count == 2
    doc = statistics_json(model_statistics(metrics, "", "", set()))
    assert [m["name"] for m in doc["model_stats"]] == ["llama"]
    assert doc["model_stats"][0]["inference_stats"]["queue"] == {"count": 0, "ns": 0}


def test_statistics_of_a_served_model_without_requests_are_zero() -> None:
    metrics = ApiMetrics()
    (model,) = model_statistics(metrics, "idle", "1", {"idle"}).model_stats
    assert (model.name, model.version, model.inference_count) == ("idle", "1", 0)
    with pytest.raises(NotFound, match="nobody"):
        model_statistics(metrics, "nobody", "", {"idle"})


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/infer", "infer"),
        ("POST", "/v2/models/x/infer", "infer"),
        ("POST", "/v2/models/x/versions/2/infer", "infer"),
        ("POST", "/infer/stream", "stream"),
        ("POST", "/v2/models/x/generate", "generate"),
        ("POST", "/v2/models/x/generate_stream", "generate"),
        ("POST", "/v1/chat/completions", "openai"),
        ("GET", "/v1/models", None),
        ("POST", "/register", None),
        ("GET", "/metrics", None),
    ],
)
def test_endpoint_kinds(method: str, path: str, kind: str | None) -> None:
    assert endpoint_of(method, path) == kind


def _record(**fields: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "anyserve.access", "msg": "POST /infer 200"})
    record.fields = fields
    return record


def test_json_lines_carry_the_fields_as_keys() -> None:
    doc = json.loads(JsonFormatter().format(_record(request_id="r1", status=200)))
    assert doc["request_id"] == "r1" and doc["status"] == 200
    assert doc["logger"] == "anyserve.access" and doc["message"] == "POST /infer 200"


def test_text_lines_show_the_fields_and_skip_empty_ones() -> None:
    text = TextFormatter().format(_record(request_id="r1", trace_id=""))
    assert text.endswith("POST /infer 200 request_id=r1")
    with pytest.raises(ValueError, match="log format"):
        formatter("yaml")
