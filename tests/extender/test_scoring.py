"""Golden values of the scoring function, and the orderings it promises."""

from __future__ import annotations

import logging

import pytest

from extender.index import NodeIndex
from extender.nodes import flatten_facts, parse_node
from extender.scoring import DEFAULT_PARAMS, Params, Variant, cold_seconds, decide, restore_seconds
from extender.synthetic import H100_FACTS, H200_FACTS, WORKLOAD, cached, node
from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.facts import compat_key

SNAP = "qwen3-8b-vllm"
GB = 10**9
H100 = compat_key(H100_FACTS)
H200 = compat_key(H200_FACTS)


def test_constants_reproduce_the_measurements() -> None:
    # DESIGN.md: an 8.1 GB image restored in 6.8 s from disk; its model cold-started in 34 s.
    assert restore_seconds(8_100_000_000, "disk") == pytest.approx(6.76, abs=0.01)
    assert cold_seconds(8_100_000_000) == pytest.approx(33.5, abs=0.01)
    assert cold_seconds(None) == DEFAULT_PARAMS.cold_default_s


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
            5.85,
            9,
        ),  # 10 * 1.0 * (1 - 0.1 * 0.8) = 9.2
        (
            node("d", snapshots=[cached(SNAP, 8_100_000_000, "disk")]),
            "disk",
            6.76,
            8,
        ),  # 10 * ln(33.5/6.76) / ln(33.5/5.85) * 0.92 = 8.4
        (node("f", snapshots=[]), "fetch", 13.24, 5),
        (
            node("q", snapshots=[cached(SNAP, 8_100_000_000, "disk")], restoring=2),
            "disk",
            13.52,
            5,
        ),  # 10 * 0.521 * 0.92 = 4.8: two restores in progress, no better than fetching (5.3)
        (node("g", facts=H100_FACTS, gfd=True), "fetch", 13.24, 5),
        (node("x", facts=H200_FACTS, snapshots=[]), "cold", 33.5, 0),
        (node("n", facts=None), "cold", 33.5, 0),
    ],
)
def test_golden(entry: dict[str, object], tier: str, seconds: float, score: int) -> None:
    d = one(entry, {H100: Variant(8_100_000_000, holders=2)})
    assert (d.tier, round(d.seconds, 2), d.score) == (tier, seconds, score)
    assert d.restorable == (tier != "cold")
    assert d.cold_seconds == pytest.approx(33.5, abs=0.01)


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
