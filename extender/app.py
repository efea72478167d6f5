"""The extender's Flask app: thin HTTP around :mod:`extender.handlers` and the node index.

Served by one gunicorn gthread worker (``thaw extender``): one process means one node index fed by
one watch, shared by all request threads. Several worker processes would each need their own
watch (N times the apiserver load, N views that disagree for a moment); threads are enough because
a request is a few dict lookups and one orjson call, well under a millisecond of GIL time.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from flask import Flask, Response, request
from prometheus_client import Counter, Gauge, Histogram

from extender import handlers
from extender.index import NodeIndex
from extender.nodes import load_node_list
from extender.scoring import DEFAULT_PARAMS, Params
from extender.watch import NodeWatch
from thaw.serve.serving import metrics_payload

log = logging.getLogger(__name__)

REQUESTS = Counter(
    "thaw_extender_requests_total", "Extender requests by verb and HTTP status", ["verb", "code"]
)
LATENCY = Histogram(
    "thaw_extender_request_seconds",
    "Time to answer a filter or prioritize request (handler only, excluding HTTP)",
    ["verb"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
NODES = Gauge("thaw_extender_nodes", "Nodes in the extender's view")
READY = Gauge("thaw_extender_ready", "1 when the node view is current (after the first full list)")
RELISTS = Gauge("thaw_extender_node_lists", "Full node lists done by the watch (relists + 1)")

FILE_CHECK_S = 0.25  # how often FileView checks a --nodes file for changes: one stat() per check

# The largest request body read. With nodeCacheCapable: true (the shipped configuration) a 5,000-node
# ExtenderArgs is ~100 KB of names; with false, kube-scheduler sends whole Node objects: 5,000 of
# extender.synthetic's (labels, status, Thaw's annotations, no managedFields) are 11.7 MB, and real
# nodes carry more (managedFields, dozens of GPU Feature Discovery labels, images). 64 MiB admits
# 5,000 nodes of up to ~13 KB each (5x the synthetic ones); larger clusters or nodes should use
# nodeCacheCapable: true. A bigger body is answered 413 with the reason, before it is read (by
# Content-Length) or as soon as it passes the limit (chunked).
MAX_BODY_BYTES = 64 * 2**20


@dataclass
class AppConfig:
    nodes_file: Path | None = None  # a NodeList file instead of watching the cluster
    nodes_check_s: float = FILE_CHECK_S  # how often a --nodes file is checked for changes
    params: Params = DEFAULT_PARAMS
    api_client: Any = None  # a kubernetes.client.ApiClient; None: in-cluster config or KUBECONFIG
    watch_options: dict[str, Any] = field(default_factory=dict)


# Set by extender.cli before gunicorn forks; create_app() runs in the worker and reads it.
CONFIG = AppConfig()


class FileView:
    """A --nodes file view: loaded at start, reloaded when the file changes (demos and tests change
    it to play a cluster whose nodes' caches and restore queues move). A thread checks the file's
    (mtime, size, inode) every ``interval`` seconds, off the request path; a file that no longer
    parses keeps the last good view, with a warning. Ready once loaded."""

    def __init__(self, index: NodeIndex, path: Path, interval: float = FILE_CHECK_S) -> None:
        self.index = index
        self.path = path
        self.interval = interval
        self.reloads = 0
        self._seen: tuple[int, int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self) -> bool:
        """Load the file if it changed since the last load; whether the view was replaced."""
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        try:
            items, rv = load_node_list(self.path)
        except (OSError, ValueError) as exc:
            log.warning("--nodes: keeping the last view: %s", exc)
            self._seen = stamp  # warn once per change
            return False
        self._seen = stamp
        self.index.replace_all(items, rv)
        self.reloads += 1
        log.info("extender: %d nodes from %s (resourceVersion %s)", len(self.index.nodes), self.path, rv)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="thaw-nodes-file", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.load()

    def stop(self) -> None:
        self._stop.set()

    def ready(self) -> bool:
        return self.index.synced


_STATUS = {200: "200 OK", 400: "400 Bad Request", 413: "413 Content Too Large"}


class TooLarge(ValueError):
    """A request body over MAX_BODY_BYTES."""


def read_body(environ: dict[str, Any], limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body in one read (Content-Length, or to the end of a chunked body); at most
    ``limit`` bytes: a longer body raises TooLarge, having read no more than ``limit + 1`` bytes."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            n = int(length)
        except ValueError:
            return b""
        if n > limit:
            raise TooLarge(f"Content-Length {n}")
        return bytes(stream.read(n)) if n > 0 else b""
    if environ.get("wsgi.input_terminated"):  # chunked: the server marks the end
        data = bytes(stream.read(limit + 1))
        if len(data) > limit:
            raise TooLarge("a chunked body")
        return data
    return b""


def too_large_body(verb: str, what: str) -> bytes:
    """The 413 answer: the protocol's shape for the verb, with the reason in Error."""
    msg = (
        f"request body ({what}) is larger than the extender's limit of {MAX_BODY_BYTES} bytes; "
        "for clusters this large use nodeCacheCapable: true (names only)"
    )
    return orjson.dumps({"FailedNodes": {}, "Error": msg} if verb == "filter" else {"Error": msg})


class Deferred:
    """The handlers' work that waits until an answer is sent (noting where a pod will land), and
    the order it keeps: a request that arrives while some is pending waits for it (at most
    ``wait_s``), so the next pod's answer counts the pod placed just before it."""

    def __init__(self, wait_s: float = 0.01) -> None:
        self.wait_s = wait_s
        self.pending = 0
        self._cond = threading.Condition()

    def body(self, out: bytes, after: Callable[[], None]) -> _Sent:
        with self._cond:
            self.pending += 1
        return _Sent(out, after, self)

    def done(self) -> None:
        with self._cond:
            self.pending -= 1
            self._cond.notify_all()

    def settle(self) -> None:
        if self.pending:  # unlocked read: the common case costs nothing
            with self._cond:
                self._cond.wait_for(lambda: not self.pending, timeout=self.wait_s)


class _Sent:
    """A one-piece WSGI body whose close() (called by the server once the answer is sent) runs the
    handler's deferred work: the request's latency does not include it."""

    def __init__(self, body: bytes, after: Callable[[], None], deferred: Deferred) -> None:
        self.body = body
        self.after = after
        self.deferred = deferred

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    def close(self) -> None:
        try:
            self.after()
        except Exception:  # bookkeeping must never turn into an error for the scheduler
            log.exception("extender: noting a placement failed")
        finally:
            self.deferred.done()


class Verbs:
    """WSGI middleware answering the two extender verbs directly, timing them for the metrics."""

    def __init__(self, inner: Callable[..., Iterable[bytes]], index: NodeIndex) -> None:
        self.inner = inner
        self.index = index
        self.deferred = Deferred()
        self.verbs = {
            "/filter": ("filter", handlers.filter_deferred),
            "/prioritize": ("prioritize", handlers.prioritize_deferred),
        }
        # Metric children bound once: labels() is a locked dict lookup on every call otherwise.
        self.latency = {verb: LATENCY.labels(verb) for verb, _ in self.verbs.values()}
        self.counted = {
            (verb, code): REQUESTS.labels(verb, str(code))
            for verb, _ in self.verbs.values()
            for code in _STATUS
        }

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = self.verbs.get(environ.get("PATH_INFO", ""))
        if route is None or environ.get("REQUEST_METHOD") != "POST":
            return self.inner(environ, start_response)
        verb, fn = route
        try:
            body = read_body(environ)
        except TooLarge as exc:
            self.counted[(verb, 413)].inc()
            out = too_large_body(verb, str(exc))
            # The rest of the body stays unread: gunicorn drains at most 64 KiB of it before it
            # would reuse the connection, and otherwise closes it.
            start_response(
                _STATUS[413], [("Content-Type", "application/json"), ("Content-Length", str(len(out)))]
            )
            return [out]
        self.deferred.settle()
        start = time.perf_counter()
        status, out, after = fn(self.index, body)
        self.latency[verb].observe(time.perf_counter() - start)
        counter = self.counted.get((verb, status))
        (counter or REQUESTS.labels(verb, str(status))).inc()
        start_response(
            _STATUS.get(status, f"{status} Error"),
            [("Content-Type", "application/json"), ("Content-Length", str(len(out)))],
        )
        return [out] if after is None else self.deferred.body(out, after)


# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms). The
# watch thread parses events in runs (a chunk of the stream holds several) without blocking, and a
# request that arrives meanwhile would wait for the whole run: a shorter slice bounds that wait,
# at the cost of more switches, which only happen while two threads want to run.
SWITCH_INTERVAL_S = 0.0005


def create_app(config: AppConfig | None = None) -> Flask:
    cfg = config or CONFIG
    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the worker process serves only this app
    index = NodeIndex(cfg.params)
    view: NodeWatch | FileView
    if cfg.nodes_file is not None:
        view = FileView(index, cfg.nodes_file, cfg.nodes_check_s)
        if not view.load():
            raise ValueError(f"--nodes {cfg.nodes_file}: no NodeList could be read")
        view.start()
    else:
        view = NodeWatch(index, cfg.api_client, **cfg.watch_options)
        view.start()

    app = Flask("thaw-extender")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["index"] = index
    app.config["view"] = view

    # POST /filter and /prioritize skip Flask's routing, request and response objects: the body is
    # read in one call (werkzeug's get_data reads it 64 KiB at a time, copying as it goes: ~12 MB
    # with full Nodes) and the handler's bytes go out as they are. Everything else is Flask's.
    app.wsgi_app = Verbs(app.wsgi_app, index)  # type: ignore[method-assign]

    # Reached only past the middleware (its routes in the url map, and 405 for other methods).
    @app.post("/filter")
    def filter_() -> Response:
        status, body = handlers.filter_(index, request.get_data(cache=False))
        return Response(body, status=status, mimetype="application/json")

    @app.post("/prioritize")
    def prioritize() -> Response:
        status, body = handlers.prioritize(index, request.get_data(cache=False))
        return Response(body, status=status, mimetype="application/json")

    @app.get("/healthz")
    def healthz() -> Response:
        return Response("ok\n", mimetype="text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        if view.ready():
            rv = f" at resourceVersion {index.resource_version}" if index.resource_version else ""
            return Response(f"ok: {len(index.nodes)} nodes{rv}\n", mimetype="text/plain")
        why = "no full node list yet" if not index.synced else "node watch lost; relisting"
        return Response(f"not ready: {why}\n", status=503, mimetype="text/plain")

    @app.get("/metrics")
    def metrics() -> Response:
        NODES.set(len(index.nodes))
        READY.set(1 if view.ready() else 0)
        if isinstance(view, NodeWatch):
            RELISTS.set(view.relists)
        body, ctype = metrics_payload()
        return Response(body, content_type=ctype)

    return app
