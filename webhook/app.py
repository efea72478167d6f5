"""The webhook's HTTP surface: a thin Flask app around ``webhook.review.build_response``.

``POST /mutate``: namespaces *not* labelled ``thaw.dev/restore=allowed`` (admitted unchanged, with a
warning, for opted-in pods); ``POST /mutate-restore``: namespaces with the label (full injection).
kube-apiserver picks the path with two webhook entries and ``namespaceSelector``. ``GET /healthz``,
``/readyz``, ``/metrics``. Served by gunicorn through ``thaw.serve.serving`` (``thaw webhook``).

The configuration file is named by ``THAW_CONFIG`` (``--config``; the CLI checks it before forking)
and turned into ``Prepared`` once per worker.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import get_args

from flask import Flask, Response, request
from prometheus_client import Counter, Gauge, Histogram
from werkzeug.exceptions import RequestEntityTooLarge

from thaw.serve.serving import metrics_payload
from webhook.config import CONFIG_ENV, load_config
from webhook.patches import Prepared
from webhook.review import Outcome, build_response

log = logging.getLogger(__name__)

# kube-apiserver's own limit for a request body is 3 MiB (etcd's object limit is 1.5 MiB; a Pod
# AdmissionReview carries the object once, plus metadata). Anything larger is not a real review.
MAX_BODY_BYTES = 3 * 1024 * 1024

ADMISSIONS = Counter(
    "thaw_webhook_admissions_total",
    "Admission reviews answered, by path and outcome (mutated, unchanged, refused, error, invalid).",
    ["path", "outcome"],
)
LATENCY = Histogram(
    "thaw_webhook_admission_seconds",
    "Time to answer one admission review inside the server (parse, mutate, encode).",
    ["path"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)

# One series per live worker process (label pid, added by the multiprocess collector): how the
# kernel spread connections over the workers (SO_REUSEPORT), visible to operators and the benchmark.
WORKER_ADMISSIONS = Gauge(
    "thaw_webhook_worker_admissions",
    "Admission reviews answered by this worker process since it started (pid label: one per worker).",
    multiprocess_mode="liveall",
)

_JSON = "application/json"


def create_app(prepared: Prepared | None = None) -> Flask:
    """The Flask app; ``prepared`` defaults to the configuration named by ``THAW_CONFIG``."""
    if prepared is None:
        path = os.environ.get(CONFIG_ENV)
        prepared = Prepared.build(load_config(Path(path) if path else None))
    app = Flask("thaw-webhook")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    ready = prepared  # bound once: the handlers below close over it

    # Metric children bound once: labels() is a locked dict lookup on every call otherwise.
    paths = ("/mutate", "/mutate-restore")
    latency = {p: LATENCY.labels(p) for p in paths}
    counted = {(p, o): ADMISSIONS.labels(p, o) for p in paths for o in get_args(Outcome)}

    def admit(path: str, restore_allowed: bool) -> Response:
        start = time.perf_counter()
        answer = build_response(request.get_data(cache=False), ready, restore_allowed)
        latency[path].observe(time.perf_counter() - start)
        counted[path, answer.outcome].inc()
        WORKER_ADMISSIONS.inc()
        return Response(answer.body, status=answer.http_status, mimetype=_JSON)

    @app.post("/mutate")
    def mutate_safe() -> Response:
        return admit("/mutate", False)

    @app.post("/mutate-restore")
    def mutate_restore() -> Response:
        return admit("/mutate-restore", True)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b"ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        # Ready once the configuration is loaded, which create_app has done.
        return Response(b"ok\n", mimetype="text/plain")

    @app.get("/metrics")
    def metrics() -> Response:
        payload, content_type = metrics_payload()
        return Response(payload, content_type=content_type)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc: RequestEntityTooLarge) -> Response:
        ADMISSIONS.labels(request.path, "invalid").inc()
        body = b'{"error":"request body is larger than the limit of %d bytes"}' % MAX_BODY_BYTES
        return Response(body, status=413, mimetype=_JSON)

    return app
