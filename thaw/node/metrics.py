"""The agent's Prometheus metrics and readiness: ``GET /metrics``, ``/readyz``, ``/healthz`` on
``--metrics-port`` (plain HTTP on the pod's IP; nothing here is secret beyond what the Node's
annotations already say).

Counted from what the agent reads anyway: the pass it just made over the cache (bytes, budget,
evictions, tiers) and the outcome copies of this node's pods (how each container started, how its
checkpoint went, how long it took to be ready, what its fetch moved). Each outcome is counted once
per container start; copies that were already there when the agent started are not counted again
(an agent restart must not replay a week of starts into ``increase()``).

``reason_category`` is pure and bounded (every reason maps to one of a fixed set of labels: a
Prometheus label must never carry free text); :class:`AgentMetrics` holds the registry;
:func:`serve` is the HTTP server around it. The metric names are listed in ``METRICS`` and in
docs/observability.md, "Metrics"; monitoring/ (alerts, dashboard) and its tests name only these.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

log = logging.getLogger("thaw.agent")

# Cold-start reasons as `thaw fetch` and `thaw exec` write them (docs/cold-start-reasons.md):
# the text before the first colon. Anything else is "other".
COLD_CATEGORIES = (
    "no snapshot for this workload",
    "no snapshot",
    "incompatible",
    "unsigned",
    "untrusted",
    "bad signature",
    "digest mismatch",
    "cache full",
    "store unreadable",
    "node facts",
    "tampered manifest",
    "malformed manifest",
    "cache error",
    "invalid name",
    "invalid namespace",
    "internal error",
    "deadline",
)
# A failed restore ("restore failed: ..."): what failed, from the phrases thaw exec uses.
RESTORE_FAILURES = (
    ("CUDA restore failed", "cuda"),
    ("criu restore", "criu"),
    ("criu not found", "criu"),
    ("cannot run", "criu"),
    ("did not wake", "wake"),
    ("is not ready", "not ready"),
    ("PIDs", "pids"),
    ("snapshot was taken of command", "command"),
    ("digest", "verification"),
    ("manifest", "verification"),
    ("configuration", "configuration"),
    ("gone", "snapshot gone"),
)
CHECKPOINT_STATUSES = ("published", "failed", "skipped")
READY_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200)
RECOUNT_WINDOW_S = 120.0
FETCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

# Every family the agent serves (the names Prometheus shows: counters with _total), for tests and docs.
METRICS = (
    "thaw_agent_starts_total",
    "thaw_agent_time_to_ready_seconds",
    "thaw_agent_checkpoints_total",
    "thaw_agent_checkpoint_bytes_total",
    "thaw_agent_fetches_total",
    "thaw_agent_fetch_bytes_total",
    "thaw_agent_fetch_seconds",
    "thaw_agent_cache_bytes",
    "thaw_agent_cache_budget_bytes",
    "thaw_agent_cache_free_bytes",
    "thaw_agent_cache_snapshots",
    "thaw_agent_cache_restoring",
    "thaw_agent_cache_evictions_total",
    "thaw_agent_passes_total",
    "thaw_agent_last_pass_success_timestamp_seconds",
    "thaw_agent_policy_writes_enabled",
)


def reason_category(result: str, reason: str) -> str:
    """The label for how a container started: ``restored``, a cold-start category, or
    ``restore failed: <what>``. Bounded: unknown text is ``other``."""
    if result == "restored":
        return "restored"
    if reason.startswith("restore failed"):
        rest = reason[len("restore failed") :]
        for phrase, what in RESTORE_FAILURES:
            if phrase in rest:
                return f"restore failed: {what}"
        return "restore failed: other"
    head = reason.split(":", 1)[0].strip()
    if head in COLD_CATEGORIES:
        return head
    if reason.startswith("no restore plan"):
        return "no plan"
    return "other"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


@dataclass
class Pass:
    """What one agent pass tells the metrics (thaw.node.agent.PassResult or the same fields)."""

    ok: bool
    inventory: Mapping[str, Any] | None = None
    evicted: int = 0
    incompatible: int = 0
    stale: int = 0


@dataclass
class AgentMetrics:
    budget: int
    interval_s: float = 30.0
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    clock: Any = time.time
    _seen: set[str] = field(default_factory=set)
    _first_pass: bool = True
    _started_at: float = 0.0
    _last_ok: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        r = self.registry
        self._started_at = self.clock()
        ProcessCollector(registry=r)
        self.starts = Counter(
            "thaw_agent_starts",
            "Thaw containers started on this node, by how: restored, or why cold (a bounded category)",
            ["reason"],
            registry=r,
        )
        self.ready = Histogram(
            "thaw_agent_time_to_ready_seconds",
            "From thaw exec's start to a ready server: restores (CRIU, CUDA, wake, readiness) and "
            "cold starts that checkpointed (their wait for readiness)",
            ["start"],
            buckets=READY_BUCKETS,
            registry=r,
        )
        self.checkpoints = Counter(
            "thaw_agent_checkpoints", "Checkpoints of pods on this node, by outcome", ["status"], registry=r
        )
        self.checkpoint_bytes = Counter(
            "thaw_agent_checkpoint_bytes", "Bytes of the snapshots published from this node", registry=r
        )
        self.fetches = Counter(
            "thaw_agent_fetches",
            "Restore plans on this node by where the snapshot was: hit (already in the node cache) or "
            "miss (fetched from the store)",
            ["result"],
            registry=r,
        )
        self.fetch_bytes = Counter(
            "thaw_agent_fetch_bytes",
            "Bytes thaw fetch copied from the store into this node's cache",
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "thaw_agent_fetch_seconds",
            "Time thaw fetch spent copying a snapshot into this node's cache (misses only)",
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        self.cache_bytes = Gauge("thaw_agent_cache_bytes", "Bytes of snapshots in the node cache", registry=r)
        self.cache_budget = Gauge(
            "thaw_agent_cache_budget_bytes", "The node cache's byte budget (thaw agent --budget)", registry=r
        )
        self.cache_free = Gauge(
            "thaw_agent_cache_free_bytes", "Free bytes on the node cache's filesystem", registry=r
        )
        self.cache_snapshots = Gauge(
            "thaw_agent_cache_snapshots", "Snapshots in the node cache, by tier", ["tier"], registry=r
        )
        self.cache_restoring = Gauge(
            "thaw_agent_cache_restoring", "Restores in progress on this node", registry=r
        )
        self.evictions = Counter(
            "thaw_agent_cache_evictions",
            "Snapshots removed from the node cache: budget (least recently used), incompatible (the "
            "node's facts changed), stale (leftovers of interrupted fetches)",
            ["reason"],
            registry=r,
        )
        self.passes = Counter("thaw_agent_passes", "Agent passes, by result", ["result"], registry=r)
        self.last_ok = Gauge(
            "thaw_agent_last_pass_success_timestamp_seconds",
            "Unix time of the last pass that reported the node (0: none yet)",
            registry=r,
        )
        self.writes = Gauge(
            "thaw_agent_policy_writes_enabled",
            "1 where the agent makes this write (its admission policy is in force), 0 where it does not",
            ["write"],
            registry=r,
        )
        self.cache_budget.set(self.budget)
        for tier in ("memory", "disk"):
            self.cache_snapshots.labels(tier)
        for status in CHECKPOINT_STATUSES:
            self.checkpoints.labels(status)
        for result in ("hit", "miss"):
            self.fetches.labels(result)
        for reason in ("budget", "incompatible", "stale"):
            self.evictions.labels(reason)
        for result in ("ok", "failed"):
            self.passes.labels(result)
        for start in ("restore", "cold"):
            self.ready.labels(start)

    # ---- the pass ------------------------------------------------------------------------------
    def observe_pass(self, p: Pass, outcomes: Iterable[tuple[str, Mapping[str, Any], float]] = ()) -> None:
        """Record one pass: its cache numbers and every outcome copy (uid, outcome, mtime)."""
        with self._lock:
            self.passes.labels("ok" if p.ok else "failed").inc()
            if p.ok:
                self._last_ok = self.clock()
                self.last_ok.set(self._last_ok)
            self.evictions.labels("budget").inc(p.evicted)
            self.evictions.labels("incompatible").inc(p.incompatible)
            self.evictions.labels("stale").inc(p.stale)
            if p.inventory is not None:
                self._observe_inventory(p.inventory)
            self._observe_outcomes(outcomes)
            self._first_pass = False

    def set_writes(self, enabled: Mapping[str, bool]) -> None:
        for write, on in enabled.items():
            self.writes.labels(write).set(1 if on else 0)

    def writes_from(self, api: Any) -> None:
        """The writes a GuardedApi (thaw.node.policy) makes; nothing without an API (a dry run)."""
        missing = getattr(api, "missing", None)
        if isinstance(missing, Mapping):
            from thaw.node.policy import EVENTS_POLICY, NODE_POLICY

            self.set_writes({"node": NODE_POLICY not in missing, "events": EVENTS_POLICY not in missing})

    def _observe_inventory(self, inv: Mapping[str, Any]) -> None:
        snaps = [s for s in inv.get("snapshots") or [] if isinstance(s, Mapping)]
        self.cache_bytes.set(sum(int(s.get("bytes") or 0) for s in snaps))
        free = _number(inv.get("free_bytes"))
        if free is not None:
            self.cache_free.set(free)
        for tier in ("memory", "disk"):
            self.cache_snapshots.labels(tier).set(sum(1 for s in snaps if s.get("tier") == tier))
        self.cache_restoring.set(_number(inv.get("restoring")) or 0)

    def _observe_outcomes(self, outcomes: Iterable[tuple[str, Mapping[str, Any], float]]) -> None:
        current: set[str] = set()
        # An agent restarting finds older copies its predecessor already counted; those changed in
        # the last passes before it started may not have been, so they are (at most a few twice).
        horizon = self._started_at - max(2 * self.interval_s, RECOUNT_WINDOW_S)
        for uid, outcome, mtime in outcomes:
            started = str(outcome.get("started", ""))
            for key, count in self._facts(uid, started, outcome):
                current.add(key)
                if key in self._seen:
                    continue
                self._seen.add(key)
                if self._first_pass and mtime < horizon:
                    continue
                count()
        self._seen &= current  # copies removed (pods gone) are forgotten

    def _facts(self, uid: str, started: str, outcome: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """(dedup key, how to count it) for each fact of one outcome that is final."""
        out: list[tuple[str, Any]] = []
        base = f"{uid}\0{started}"
        result = outcome.get("result")
        if result in ("restored", "cold"):
            category = reason_category(str(result), str(outcome.get("reason") or ""))
            raw_timings = outcome.get("timings")
            timings: Mapping[str, Any] = raw_timings if isinstance(raw_timings, Mapping) else {}

            def start() -> None:
                self.starts.labels(category).inc()
                total = _number(timings.get("total_s")) if result == "restored" else None
                if total is not None:
                    self.ready.labels("restore").observe(total)

            out.append((f"{base}\0start", start))
        raw_plan = outcome.get("plan")
        plan: Mapping[str, Any] = raw_plan if isinstance(raw_plan, Mapping) else {}
        raw_fetch = plan.get("fetch")
        fetch: Mapping[str, Any] | None = raw_fetch if isinstance(raw_fetch, Mapping) else None
        if plan.get("action") == "restore" and fetch is not None:
            copied, seconds = _number(fetch.get("bytes")), _number(fetch.get("seconds"))

            def fetched() -> None:
                if not copied:
                    self.fetches.labels("hit").inc()
                    return
                self.fetches.labels("miss").inc()
                self.fetch_bytes.inc(copied)
                if seconds is not None:
                    self.fetch_seconds.observe(seconds)

            out.append((f"{base}\0fetch", fetched))
        ck = outcome.get("checkpoint")
        if isinstance(ck, Mapping) and ck.get("status") in CHECKPOINT_STATUSES:
            status = str(ck["status"])
            size, ready_s = _number(ck.get("bytes")), _number(ck.get("ready_s"))

            def checkpoint() -> None:
                self.checkpoints.labels(status).inc()
                if status == "published" and size is not None:
                    self.checkpoint_bytes.inc(size)
                if ready_s is not None:
                    self.ready.labels("cold").observe(ready_s)

            out.append((f"{base}\0checkpoint\0{status}", checkpoint))
        return out

    # ---- serving -------------------------------------------------------------------------------
    def is_ready(self, now: float | None = None) -> tuple[bool, str]:
        """Ready once a pass has reported the node, and while the last one that did is recent."""
        now = self.clock() if now is None else now
        if self._last_ok is None:
            return False, "no pass has reported the node yet"
        stale_after = max(10 * self.interval_s, 300.0)
        age = now - self._last_ok
        if age > stale_after:
            return False, f"the last pass that reported the node was {age:.0f} s ago"
        return True, "ok"

    def payload(self) -> bytes:
        return generate_latest(self.registry)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6


def serve(metrics: AgentMetrics, port: int, host: str = "::") -> ThreadingHTTPServer:
    """Serve /metrics, /readyz and /healthz on ``host:port`` in a daemon thread (both IPv6 and IPv4
    where the kernel has IPv6, else IPv4 only)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.payload(), CONTENT_TYPE_LATEST)
            elif path == "/readyz":
                ok, why = metrics.is_ready()
                self._send(200 if ok else 503, why.encode() + b"\n", "text/plain")
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            else:
                self._send(404, b"not found: /metrics, /readyz, /healthz\n", "text/plain")

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server: ThreadingHTTPServer
    try:
        server = _Server((host, port), Handler)
    except OSError:
        if host != "::":
            raise
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # no IPv6 in this kernel
        server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="thaw-agent-metrics", daemon=True).start()
    log.info("metrics on port %d: /metrics, /readyz", server.server_address[1])
    return server


def outcome_copies(cache: Path) -> list[tuple[str, dict[str, Any], float]]:
    """The outcome copies of this node's pods, read bounded (thaw.snapshot.outcome_copy)."""
    from thaw.node.events import OUTCOME_MAX_AGE_S
    from thaw.snapshot.outcome_copy import read_outcome_copies

    return list(read_outcome_copies(cache, OUTCOME_MAX_AGE_S))


def start(args: Any, api: Any) -> _Hook | None:
    """The agent's metrics, served on ``--metrics-port`` (None when it is 0)."""
    port = int(getattr(args, "metrics_port", 0) or 0)
    if port <= 0:
        return None
    metrics = AgentMetrics(budget=int(args.budget), interval_s=float(args.interval))
    serve(metrics, port)
    metrics.writes_from(api)
    return _Hook(metrics)


def _count(items: Any) -> int:
    return len(items) if isinstance(items, list) else 0


@dataclass
class _Hook:
    """What the agent loop calls after each pass (kept here so the loop needs one line)."""

    metrics: AgentMetrics

    def after_pass(self, cache: Path, result: Any, api: Any) -> None:
        if result is None:
            p = Pass(ok=False)
        else:
            p = Pass(
                ok=True,
                inventory=getattr(result, "inventory", None),
                evicted=_count(getattr(result, "evicted", None)),
                incompatible=_count(getattr(result, "incompatible", None)),
                stale=_count(getattr(result, "stale", None)),
            )
        try:
            copies = outcome_copies(cache)
        except OSError as exc:
            log.warning("metrics: cannot read the outcome copies: %s", exc)
            copies = []
        self.metrics.observe_pass(p, copies)
        self.metrics.writes_from(api)
