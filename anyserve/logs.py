"""Log formats (``--log-format text|json``) and the access logs.

Access lines go to the ``anyserve.access`` logger at INFO, one per request at
the API server and one per call at a replica; their fields travel on the
record as ``fields`` (a dict), so the JSON format emits them as keys and the
text format shows them as ``key=value`` in the message. Turn them off with
``logging.getLogger("anyserve.access").setLevel(logging.WARNING)``.

``ANYSERVE_LOG_FORMAT`` carries the format to worker processes; a worker's
lines carry its ``worker`` id (:func:`set_worker`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from anyserve import memory

_PR_SET_NAME = 15  # prctl option, from linux/prctl.h

#: The access-log logger (INFO: one line per request or call).
access = logging.getLogger("anyserve.access")

FORMATS = ("text", "json")
ENV_FORMAT = "ANYSERVE_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CAP = "x-capability-"

# The worker id every record of this process carries (empty outside workers).
_worker = ""

# LogRecord attributes that are not a caller's extra fields.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}


def name_process(name: str) -> None:
    """Name this process as ``ps``, ``top`` and ``/proc/<pid>/comm`` show it
    (at most 15 bytes; Linux only): a forked worker's command line is its
    fork server's, so this is what tells the workers apart. Never raises."""
    prctl = getattr(memory.libc(), "prctl", None)
    if prctl is not None:
        prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def set_worker(worker_id: str) -> None:
    """Mark this process's log records with ``worker_id`` (worker processes)."""
    global _worker
    _worker = worker_id


class _WorkerFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _worker and not hasattr(record, "worker"):
            record.worker = _worker
        return True


class TextFormatter(logging.Formatter):
    """``asctime level logger: message``, the record's ``fields`` as
    ``key=value``, then ``[worker=...]`` in a worker."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            text += "".join(f" {k}={v}" for k, v in fields.items() if v not in ("", None))
        worker = getattr(record, "worker", "")
        return f"{text} [worker={worker}]" if worker else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``,
    the record's ``fields`` and other extras, ``exc_info`` as text."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            doc.update(fields)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``); ValueError otherwise."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def configure(level: int | str, fmt: str | None = None) -> None:
    """Configure the root logger: ``level``, one stderr handler with ``fmt``
    (default: ``$ANYSERVE_LOG_FORMAT``, else text). Exported to the
    environment so that child processes (workers) log in the same format.
    Raises ValueError for an unknown format."""
    fmt = fmt or os.environ.get(ENV_FORMAT) or "text"
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(fmt))
    handler.addFilter(_WorkerFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    os.environ[ENV_FORMAT] = fmt


def access_line(message: str, fields: Mapping[str, Any]) -> None:
    """Write one access-log line: ``message`` then ``key=value`` for text, the
    fields as keys for JSON. Callers check ``access.isEnabledFor(INFO)`` first."""
    access.info(message, extra={"fields": fields})


def call_line(method: str, metadata: Mapping[str, str], outcome: str, seconds: float) -> None:
    """One replica access-log line for a call: ``outcome`` is ``ok``, the
    anyserve error type, or ``cancelled``; ``metadata`` is the call's
    forwardable metadata (capability query, request id)."""
    query = ",".join(
        f"{k[13:].replace('-', '_')}={v}" for k, v in sorted(metadata.items()) if k.startswith(_CAP)
    )
    access_line(
        f"{method} {outcome} {seconds * 1000:.1f}ms",
        {
            "method": method,
            "query": query,
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": metadata.get("x-request-id", ""),
            "trace_id": current_trace_id() or _trace_id(metadata.get("traceparent", "")),
        },
    )


def _trace_id(traceparent: str) -> str:
    # W3C traceparent: version-traceid-spanid-flags.
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 else ""


def current_trace_id() -> str:
    """The trace id (32 hex digits) of the OpenTelemetry span current in this
    context, or "" when there is none (tracing off: no SDK, or not sampled)."""
    if "opentelemetry.trace" not in sys.modules:
        return ""  # never imported: no span can be current (and none is loaded here)
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""
