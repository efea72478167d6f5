"""The agent's metrics: reason categories (pure), counting each outcome once, and a running agent's
/metrics and /readyz (thaw/node/metrics.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fakekube import FakeKube, running
from tests.node.agentproc import running_agent
from tests.runtime.snapshots import node
from thaw.node.metrics import METRICS, AgentMetrics, Pass, reason_category
from thaw.snapshot.outcome_copy import write_outcome_copy


@pytest.mark.parametrize(
    ("result", "reason", "category"),
    [
        ("restored", "", "restored"),
        ("cold", "no snapshot: none published under qwen", "no snapshot"),
        ("cold", "no snapshot for this workload: 2 for others", "no snapshot for this workload"),
        ("cold", "incompatible: driver 580 here vs 550", "incompatible"),
        ("cold", "untrusted: key 0a1b not in /etc/thaw/trust", "untrusted"),
        ("cold", "cache full: budget 10 bytes", "cache full"),
        (
            "cold",
            "restore failed: CUDA restore failed: cuCheckpointProcessRestore(pid 4) failed",
            "restore failed: cuda",
        ),
        ("cold", "restore failed: criu restore exited 1 (log restore.log): ...", "restore failed: criu"),
        ("cold", "restore failed: restored server is not ready: timed out", "restore failed: not ready"),
        ("cold", "restore failed: something new", "restore failed: other"),
        ("cold", "no restore plan at /run/thaw/plan.json", "no plan"),
        ("cold", "a reason nobody wrote yet: with free text 12345", "other"),
    ],
)
def test_reason_category_is_a_bounded_label(result: str, reason: str, category: str) -> None:
    assert reason_category(result, reason) == category


def _outcome(result: str, reason: str = "", **more: Any) -> dict[str, Any]:
    return {"result": result, "reason": reason, "started": "2026-12-01T10:00:00Z", **more}


def _value(m: AgentMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_each_outcome_is_counted_once_and_an_agent_restart_replays_nothing() -> None:
    now = [1000.0]
    m = AgentMetrics(budget=100, interval_s=30, clock=lambda: now[0])
    restored = _outcome(
        "restored",
        plan={"action": "restore", "fetch": {"bytes": 0, "seconds": 0.1}},
        timings={"total_s": 6.9},
    )
    old = _outcome("cold", "no snapshot: x")
    copies = [("uid-1", restored, 999.0), ("uid-old", old, 100.0)]  # uid-old: long before this agent
    m.observe_pass(
        Pass(ok=True, inventory={"free_bytes": 7, "snapshots": [{"bytes": 40, "tier": "memory"}]}, evicted=2),
        copies,
    )
    m.observe_pass(Pass(ok=True), copies)  # the same copies again
    assert _value(m, "thaw_agent_starts_total", reason="restored") == 1
    assert _value(m, "thaw_agent_starts_total", reason="no snapshot") == 0
    assert _value(m, "thaw_agent_fetches_total", result="hit") == 1
    assert _value(m, "thaw_agent_time_to_ready_seconds_count", start="restore") == 1
    assert _value(m, "thaw_agent_time_to_ready_seconds_sum", start="restore") == pytest.approx(6.9)
    assert _value(m, "thaw_agent_cache_bytes") == 40
    assert _value(m, "thaw_agent_cache_snapshots", tier="memory") == 1
    assert _value(m, "thaw_agent_cache_evictions_total", reason="budget") == 2
    # A checkpoint that finishes later is counted when it is final, once.
    ck = {**old, "result": "cold", "reason": "no snapshot: x", "checkpoint": {"status": "publishing"}}
    m.observe_pass(Pass(ok=True), [("uid-2", ck, 1001.0)])
    assert _value(m, "thaw_agent_starts_total", reason="no snapshot") == 1
    assert _value(m, "thaw_agent_checkpoints_total", status="published") == 0
    ck["checkpoint"] = {"status": "published", "bytes": 5_000, "ready_s": 41.0}
    m.observe_pass(Pass(ok=True), [("uid-2", ck, 1002.0)])
    m.observe_pass(Pass(ok=True), [("uid-2", ck, 1002.0)])
    assert _value(m, "thaw_agent_checkpoints_total", status="published") == 1
    assert _value(m, "thaw_agent_checkpoint_bytes_total") == 5_000
    assert _value(m, "thaw_agent_time_to_ready_seconds_count", start="cold") == 1
    # A miss: bytes copied, and how long.
    miss = _outcome(
        "restored",
        plan={"action": "restore", "fetch": {"bytes": 8_000, "seconds": 2.0}},
        timings={"total_s": 9},
    )
    m.observe_pass(Pass(ok=False), [("uid-3", miss, 1003.0)])
    assert _value(m, "thaw_agent_fetches_total", result="miss") == 1
    assert _value(m, "thaw_agent_fetch_bytes_total") == 8_000
    assert _value(m, "thaw_agent_fetch_seconds_sum") == 2.0
    assert _value(m, "thaw_agent_passes_total", result="failed") == 1


def test_readiness_follows_the_passes_that_report() -> None:
    now = [1000.0]
    m = AgentMetrics(budget=1, interval_s=30, clock=lambda: now[0])
    assert m.is_ready() == (False, "no pass has reported the node yet")
    m.observe_pass(Pass(ok=False))
    assert not m.is_ready()[0]
    m.observe_pass(Pass(ok=True))
    assert m.is_ready() == (True, "ok")
    now[0] += 301
    ok, why = m.is_ready()
    assert not ok and "301 s ago" in why


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with running() as k:
        k.add(node("gpu-1"))
        yield k


def test_a_running_agent_serves_its_metrics_and_readiness(kube: FakeKube, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    uid = str(uuid.uuid4())
    outcome = _outcome(
        "cold",
        "restore failed: CUDA restore failed: x",
        plan={"action": "restore", "fetch": {"bytes": 4096, "seconds": 0.5}},
        checkpoint={"status": "failed", "reason": "r", "ready_s": 12.0},
    )
    write_outcome_copy(cache, uid, orjson.dumps(outcome))
    with running_agent(tmp_path, cache, kube.url) as agent:
        agent.wait("readiness", lambda: agent.get("/readyz")[0] == 200)
        agent.wait(
            "the outcome counted",
            lambda: agent.samples().get('thaw_agent_starts_total{reason="restore failed: cuda"}') == 1,
        )
        s = agent.samples()
        assert s['thaw_agent_checkpoints_total{status="failed"}'] == 1
        assert s['thaw_agent_fetches_total{result="miss"}'] == 1
        assert s["thaw_agent_fetch_bytes_total"] == 4096
        assert s["thaw_agent_cache_budget_bytes"] == 1 << 30
        assert s['thaw_agent_policy_writes_enabled{write="node"}'] == 1
        assert s["thaw_agent_last_pass_success_timestamp_seconds"] > 0
        families = {
            line.split()[2] for line in agent.get("/metrics")[1].splitlines() if line.startswith("# TYPE")
        }
        assert set(METRICS) <= {f + "_total" if f + "_total" in METRICS else f for f in families}


def test_an_agent_that_cannot_report_is_not_ready(kube: FakeKube, tmp_path: Path) -> None:
    """Its node is not in the cluster: every pass fails to patch it, so /readyz says 503 and why."""
    with running_agent(tmp_path, tmp_path / "cache", kube.url, "gpu-gone") as agent:
        agent.wait(
            "a failed pass", lambda: agent.samples().get('thaw_agent_passes_total{result="failed"}', 0) >= 1
        )
        code, body = agent.get("/readyz")
        assert code == 503 and "no pass has reported the node yet" in body
