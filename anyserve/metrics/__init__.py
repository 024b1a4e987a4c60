"""Prometheus metrics of the API server and the replica (prometheus-client).

Every server instance owns its own ``CollectorRegistry`` (several servers can
run in one process: tests do), and every label is bounded: capabilities are
those a registered replica (or this replica) serves, never what a client
sent. Labelled children are cached per capability so that a request costs a
few dictionary lookups and increments, not a label resolution.

- :mod:`anyserve.metrics.api`: the API server's figures (``GET /metrics``) and
  the per-model counters behind Triton's statistics.
- :mod:`anyserve.metrics.http`: the ASGI middleware that measures HTTP requests
  and writes the access log, and the ``/metrics`` exposition.
- :mod:`anyserve.metrics.stats`: Triton's statistics from those counters.
- :mod:`anyserve.metrics.replica`: a replica's figures, and its ``--metrics-port``.
- :mod:`anyserve.metrics.worker`: ``context.metrics`` in a worker process.

Nothing is imported here: a worker process imports only
:mod:`anyserve.metrics.worker` (no prometheus-client, no Starlette).
"""
