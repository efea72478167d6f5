"""The demo plays the agents' lag: their ``restoring`` report reaches the node file one pass after
the bind. With it, only the extender's own count of the pods it placed spreads a burst."""

from __future__ import annotations

from typing import Any

from extender.demo import example_pods, place_pods
from extender.synthetic import cached, node
from tests.extender.conftest import SIZE, SNAPSHOT


def burst() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # gpu-a restores fastest (page cache); gpu-b from disk is next best; gpu-c would fetch.
    snap = cached(SNAPSHOT, SIZE, "memory")
    items = [
        node("gpu-a", snapshots=[snap]),
        node("gpu-b", snapshots=[cached(SNAPSHOT, SIZE, "disk")]),
        node("gpu-c", snapshots=[]),
    ]
    pods = example_pods(4)
    for p in pods:
        p["metadata"]["annotations"]["thaw.dev/workload"] = snap["workload"]
    return pods, {"kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": items}


def nodes_of(**kw: Any) -> list[str]:
    pods, cluster = burst()
    return [p.node for p in place_pods(pods, out=lambda _: None, cluster=cluster, **kw)]


def test_instant_agent_reports_spread_a_burst_without_the_count() -> None:
    # What the demo showed before: the report written right after each bind (no lag). gpu-a with
    # one restore in progress (2 x 3.3 s) is a little sooner than gpu-b from disk (7.4 s), but both
    # score 7 against a 50.9 s cold start, and the tie goes to the node with fewer replicas.
    placed = nodes_of(spread=False, agent_lag_s=0.0)
    assert placed[:3] == ["gpu-a", "gpu-b", "gpu-a"], placed


def test_with_the_agents_lag_a_burst_piles_up_without_the_count() -> None:
    assert set(nodes_of(spread=False)) == {"gpu-a"}


def test_with_the_agents_lag_the_count_spreads_the_burst() -> None:
    placed = nodes_of(spread=True)
    # gpu-a first; counted there, it scores no better than gpu-b from disk (as above), which takes
    # the next.
    assert placed[:2] == ["gpu-a", "gpu-b"] and placed.count("gpu-a") < len(placed), placed
