"""Golden values of the scoring function, and the orderings it promises."""

from __future__ import annotations

import logging
import statistics

import orjson
import pytest

from extender.index import NodeIndex
from extender.nodes import flatten_facts, parse_node
from extender.scoring import (
    DEFAULT_PARAMS,
    Params,
    Variant,
    cluster_fetch_bps,
    cold_seconds,
    decide,
    fetch_seconds,
    restore_seconds,
)
from extender.simulate import MEASURED, TIERS, GroundTruth, cold_starts
from extender.synthetic import H100_FACTS, H200_FACTS, WORKLOAD, cached, node
from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.facts import compat_key

SNAP = "qwen3-8b-vllm"
GB = 10**9
H100 = compat_key(H100_FACTS)
H200 = compat_key(H200_FACTS)


def test_constants_are_the_measured_ground_truth() -> None:
    # extender/measured.json, fitted as the simulator fits it: a 20 GB image per tier within 1.5%,
    # the fixed part between the CPU stand-in's two restores, cold with no size the runs' median.
    truth = GroundTruth.load()
    size = 20 * GB
    measured = {t: truth.fixed.get(t, 0.0) + size / truth.rates[t].median for t in TIERS}
    estimated = {
        "memory": restore_seconds(size, "memory"),
        "disk": restore_seconds(size, "disk"),
        "fetch": fetch_seconds(size) - restore_seconds(size, "disk"),
        "cold": cold_seconds(size),
    }
    for tier in TIERS:
        assert estimated[tier] == pytest.approx(measured[tier], rel=0.015), tier
    assert truth.fixed["memory"] <= DEFAULT_PARAMS.restore_fixed_s <= truth.fixed["disk"]
    colds = [r["cold"] for r in cold_starts(orjson.loads(MEASURED.read_bytes()))]  # every runtime's
    assert (
        cold_seconds(None)
        == DEFAULT_PARAMS.cold_default_s
        == pytest.approx(statistics.median(colds), abs=0.1)
    )
    assert DEFAULT_PARAMS.queue_share == truth.queue_share


def one(entry: dict[str, object], variants: dict[str, Variant], nodes: int = 10, p: Params = DEFAULT_PARAMS):  # type: ignore[no-untyped-def]
    return decide(
        SNAP,
        WORKLOAD,
        parse_node(entry),
        variants=variants,
        known_facts={H100: flatten_facts(H100_FACTS)},
        node_count=nodes,
        p=p,
    )


@pytest.mark.parametrize(
    ("entry", "tier", "seconds", "score"),
    [
        (
            node("m", snapshots=[cached(SNAP, 8_100_000_000, "memory")]),
            "memory",
            3.27,
            9,
        ),  # 0.4 + 8.1/2.82; 10 * 1.0 * (1 - 0.1 * 0.8) = 9.2
        (
            node("d", snapshots=[cached(SNAP, 8_100_000_000, "disk")]),
            "disk",
            7.44,
            6,
        ),  # 0.4 + 8.1/1.15; 10 * ln(50.94/7.44) / ln(50.94/3.27) * 0.92 = 6.4
        (node("f", snapshots=[]), "fetch", 12.02, 5),  # 8.1/1.77 + 7.44; 10 * 1.444 / 2.746 = 5.3
        (
            node("q", snapshots=[cached(SNAP, 8_100_000_000, "disk")], restoring=2),
            "disk",
            22.33,
            3,
        ),  # 7.44 * (1 + 2): two restores in progress, slower than fetching (12.02)
        (node("g", facts=H100_FACTS, gfd=True), "fetch", 12.02, 5),
        (node("x", facts=H200_FACTS, snapshots=[]), "cold", 50.94, 0),  # 8.1/0.159
        (node("n", facts=None), "cold", 50.94, 0),
    ],
)
def test_golden(entry: dict[str, object], tier: str, seconds: float, score: int) -> None:
    d = one(entry, {H100: Variant(8_100_000_000, holders=2)})
    assert (d.tier, round(d.seconds, 2), d.score) == (tier, seconds, score)
    assert d.restorable == (tier != "cold")
    assert d.cold_seconds == pytest.approx(50.94, abs=0.01)


def test_tiers_are_ordered_for_every_size() -> None:
    for size in (5 * GB, 20 * GB, 70 * GB, 150 * GB):
        v = {H100: Variant(size, holders=10)}
        t = [
            one(node("m", snapshots=[cached(SNAP, size, "memory")]), v),
            one(node("d", snapshots=[cached(SNAP, size, "disk")]), v),
            one(node("f", snapshots=[]), v),
            one(node("c", facts=H200_FACTS, snapshots=[]), v),
        ]
        assert [d.tier for d in t] == ["memory", "disk", "fetch", "cold"]
        assert t[0].seconds < t[1].seconds < t[2].seconds < t[3].seconds
        assert t[0].score >= t[1].score >= t[2].score > t[3].score == 0


def test_a_busy_holder_loses_to_an_idle_equal_one() -> None:
    v = {H100: Variant(20 * GB, holders=2)}
    idle = one(node("a", snapshots=[cached(SNAP, 20 * GB, "disk")]), v)
    busy = one(node("b", snapshots=[cached(SNAP, 20 * GB, "disk")], restoring=3), v)
    assert busy.seconds > idle.seconds and busy.score < idle.score
    assert "3 restore(s) in progress" in busy.reason


def test_a_rarely_held_snapshot_scores_lower_imagelocality_style() -> None:
    entry = node("a", snapshots=[cached(SNAP, 20 * GB, "memory")])
    rare = one(entry, {H100: Variant(20 * GB, holders=1)}, nodes=100)
    common = one(entry, {H100: Variant(20 * GB, holders=100)}, nodes=100)
    assert rare.seconds == common.seconds and rare.score < common.score == 10
    flat = one(entry, {H100: Variant(20 * GB, holders=1)}, nodes=100, p=Params(spread_weight=0.0))
    assert flat.score == 10


def test_no_known_build_is_a_cold_start_everywhere() -> None:
    d = one(node("a", snapshots=[]), {})
    assert (d.tier, d.score, d.restorable) == ("cold", 0, False)
    assert "no node's thaw.dev/cache lists snapshot" in d.reason


def test_gfd_labels_that_do_not_match_are_not_restorable() -> None:
    d = one(node("g", facts=H200_FACTS, gfd=True), {H100: Variant(GB, holders=1)})
    assert d.tier == "cold" and "GPU labels (NVIDIA-H200" in d.reason


@pytest.mark.parametrize(
    ("changes", "tier"),
    [
        ({}, "fetch"),
        ({"kernel": "6.8.0-62-generic"}, "fetch"),  # a kernel patch keeps the key: labels agree
        ({"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 4}}, "fetch"),  # count is not in it
        ({"kernel": "6.11.0-19-generic"}, "cold"),  # another kernel series
        ({"driver": "590.44.01"}, "cold"),  # a driver upgrade
    ],
)
def test_gfd_labels_are_compared_as_the_key_compares_facts(changes: dict[str, object], tier: str) -> None:
    labelled = node("g", facts={**H100_FACTS, **changes}, gfd=True)  # type: ignore[arg-type]
    d = one(labelled, {H100: Variant(GB, holders=1)})
    assert d.tier == tier


def test_unreadable_annotations_rank_as_no_cache_and_log_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="extender.index")
    idx = NodeIndex()
    good = node("ok", snapshots=[cached(SNAP, 8 * GB, "memory")])
    broken = node("bad", snapshots=[cached(SNAP, 8 * GB, "memory")])
    broken["metadata"]["annotations"][NODE_CACHE] = '{"v": 1, "snapshots": "nope"}'
    idx.replace_all([good, broken], "1")
    memo = idx.decisions(SNAP, WORKLOAD)
    assert memo.decision("bad").tier == "fetch" and memo.decision("ok").tier == "memory"
    for rv in ("2", "3"):  # kubelet status updates: same annotation, new resourceVersion
        broken["metadata"]["resourceVersion"] = rv
        idx.upsert(broken)
    warnings = [r.getMessage() for r in caplog.records if "bad" in r.getMessage()]
    assert len(warnings) == 1 and "free_bytes must be an integer" in warnings[0]
    broken["metadata"]["annotations"][NODE_FACTS] = "{not json"
    idx.upsert(broken)
    assert len([r for r in caplog.records if "bad" in r.getMessage()]) == 3  # new value: logged again


def test_index_invalidation_follows_changes() -> None:
    idx = NodeIndex()
    a = node("a", snapshots=[])
    b = node("b", snapshots=[cached(SNAP, 8 * GB, "disk")])
    idx.replace_all([a, b], "1")
    memo = idx.decisions(SNAP, WORKLOAD)
    assert memo.decision("a").tier == "fetch"
    a2 = node("a", snapshots=[cached(SNAP, 8 * GB, "memory")], resource_version="2")
    idx.upsert(a2)
    assert idx.decisions(SNAP, WORKLOAD).decision("a").tier == "memory"
    b2 = node("b", snapshots=[cached(SNAP, 8 * GB, "disk")], restoring=4, resource_version="3")
    before = idx.decisions(SNAP, WORKLOAD).decision("b").seconds
    idx.upsert(b2)
    assert idx.decisions(SNAP, WORKLOAD).decision("b").seconds > before
    idx.delete("a")
    idx.delete("b")
    assert idx.decisions(SNAP, WORKLOAD).decision("a").reason.startswith("not in the extender's node view")


def with_fetch(entry: dict[str, object], bps: int, n: int = 3) -> dict[str, object]:
    """``entry`` whose agent reports its fetch throughput (thaw.dev/cache "fetch")."""
    ann = entry["metadata"]["annotations"]  # type: ignore[index]
    inv = orjson.loads(ann[NODE_CACHE])
    ann[NODE_CACHE] = orjson.dumps({**inv, "fetch": {"bps": bps, "n": n}}).decode()
    return entry


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        ([], None),
        ([0.53e9], 0.53e9),
        ([0.5e9, 0.53e9, 0.56e9, 40e9], 0.545e9),  # one node's odd report does not move it far
        ([2e9, 2.05e9, 1.95e9], 2e9),
    ],
)
def test_the_store_throughput_is_the_median_of_the_reports(
    reports: list[float], expected: float | None
) -> None:
    got = cluster_fetch_bps(reports)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=0.045)  # on a grid of 8 steps per doubling


def test_a_small_move_of_the_median_moves_no_estimate() -> None:
    a = cluster_fetch_bps([0.53e9, 0.54e9, 0.52e9])
    assert a == cluster_fetch_bps([0.53e9, 0.545e9, 0.52e9, 0.535e9])
    assert a != cluster_fetch_bps([0.6e9])


def test_fetch_estimates_follow_the_nodes_measured_throughput() -> None:
    idx = NodeIndex()
    busy = node("busy", snapshots=[cached(SNAP, 8 * GB, "disk")], restoring=1)
    idle = node("idle", snapshots=[])
    idx.replace_all([busy, idle], "1")
    memo = idx.decisions(SNAP, WORKLOAD)
    assert memo.decision("idle").seconds == pytest.approx(fetch_seconds(8 * GB))  # the constant
    assert memo.top(["busy", "idle"]) == ["idle"]  # 8/1.77 s to fetch: sooner than the busy holder
    # A third node's agent has measured a store four times slower than the constant assumes.
    idx.upsert(with_fetch(node("other", snapshots=[], resource_version="2"), 442_000_000))
    slow = memo.decision("idle")
    assert slow.seconds == pytest.approx(fetch_seconds(8 * GB, 0.442e9), rel=0.05)
    assert "at the nodes' measured 0.4" in slow.reason
    assert memo.top(["busy", "idle"]) == ["busy"]  # now waiting for the busy holder beats fetching
    idx.delete("other")
    assert memo.decision("idle").seconds == pytest.approx(fetch_seconds(8 * GB))
    assert memo.top(["busy", "idle"]) == ["idle"]
