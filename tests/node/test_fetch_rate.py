"""The ``fetch`` field of ``thaw.dev/cache`` (issue 13): the median throughput of the node's recent
misses (thaw/contract/inventory.py), the misses the agent keeps across passes (thaw/node/fetchrate.py)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from thaw.contract.inventory import (
    FETCH_MIN_BYTES,
    FETCH_SAMPLES,
    MAX_ANNOTATION_BYTES,
    CachedSnapshot,
    Inventory,
    InventoryError,
    fetch_rate,
    parse_inventory,
    render_inventory,
)
from thaw.node.fetchrate import FetchSamples, miss_of

GB = 10**9


def inv(**extra: Any) -> Inventory:
    return {"v": 1, "free_bytes": 10 * GB, "snapshots": [], **extra}  # type: ignore[typeddict-item]


@pytest.mark.parametrize(
    ("misses", "rate"),
    [
        ([], None),
        ([(4 * GB, 8.0)], {"bps": 500_000_000, "n": 1}),
        ([(4 * GB, 8.0), (2 * GB, 1.0), (6 * GB, 10.0)], {"bps": 600_000_000, "n": 3}),
        ([(FETCH_MIN_BYTES - 1, 0.001), (4 * GB, 8.0)], {"bps": 500_000_000, "n": 1}),  # too small
        ([(4 * GB, 0.0)], None),  # no time: not a measurement
        # one fetch slowed by a busy link does not move the median of the others
        ([(4 * GB, 4.0)] * 5 + [(4 * GB, 400.0)], {"bps": 1_000_000_000, "n": 6}),
        # the last FETCH_SAMPLES only: the store got faster
        ([(GB, 10.0)] * 20 + [(GB, 1.0)] * FETCH_SAMPLES, {"bps": GB, "n": FETCH_SAMPLES}),
    ],
)
def test_fetch_rate_is_the_median_of_the_recent_misses(
    misses: list[tuple[int, float]], rate: dict[str, int] | None
) -> None:
    assert fetch_rate(misses) == rate


def test_the_field_round_trips_and_is_optional() -> None:
    with_rate = inv(fetch={"bps": 530_000_000, "n": 4})
    assert parse_inventory(render_inventory(with_rate)) == with_rate
    assert "fetch" not in parse_inventory(render_inventory(inv()))


@pytest.mark.parametrize(
    "value",
    [5, {"bps": 0, "n": 1}, {"bps": 1.5e9, "n": 1}, {"bps": 10**13, "n": 1}, {"bps": 10, "n": 0},
     {"bps": 10, "n": FETCH_SAMPLES + 1}, {"bps": True, "n": 1}, {"n": 1}],
)  # fmt: skip
def test_a_malformed_fetch_field_is_refused(value: object) -> None:
    raw = orjson.dumps({"v": 1, "free_bytes": 0, "snapshots": [], "fetch": value})
    with pytest.raises(InventoryError, match="fetch must be"):
        parse_inventory(raw)


def test_the_annotation_stays_under_its_cap_with_the_field() -> None:
    snap: CachedSnapshot = {
        "name": "m", "id": "sha256:" + "a" * 64, "workload": "w" * 71, "compat": "0" * 16,
        "bytes": GB, "tier": "disk", "last_used": "2026-12-01T00:00:00Z",
    }  # fmt: skip
    big = inv(
        snapshots=[{**snap, "last_used": f"2026-12-01T00:{i // 60:02d}:{i % 60:02d}Z"} for i in range(2000)]
    )
    big["fetch"] = {"bps": 530_000_000, "n": 8}
    out = render_inventory(big)
    assert len(out.encode()) <= MAX_ANNOTATION_BYTES
    back = parse_inventory(out)
    assert back["fetch"] == {"bps": 530_000_000, "n": 8} and 0 < len(back["snapshots"]) < 2000


def outcome(started: str, copied: int, seconds: float, action: str = "restore") -> dict[str, Any]:
    plan: dict[str, Any] = {"action": action, "fetch": {"bytes": copied, "seconds": seconds}}
    return {"result": "restored", "started": started, "plan": plan}


def test_misses_are_counted_once_across_passes_and_kept_when_their_pods_go() -> None:
    samples = FetchSamples()
    first = [("u1", outcome("t1", 4 * GB, 8.0), 100.0), ("u2", outcome("t1", 0, 0.2), 101.0)]
    samples.observe(first)
    samples.observe(first)  # the same copies next pass: not counted again
    assert samples.rate() == {"bps": 500_000_000, "n": 1}
    samples.observe([("u3", outcome("t2", 2 * GB, 1.0), 200.0)])  # u1's pod is gone, its miss stays
    assert samples.rate() == {"bps": 1_250_000_000, "n": 2}
    samples.observe([("u1", outcome("t3", 4 * GB, 4.0), 300.0)])  # a new start of the same pod
    assert samples.rate() == {"bps": 1_000_000_000, "n": 3}


def test_what_is_not_a_miss() -> None:
    assert miss_of(outcome("t", 4 * GB, 8.0)) == (4 * GB, 8.0)
    assert miss_of(outcome("t", 0, 0.1)) is None  # a hit
    assert miss_of(outcome("t", 4 * GB, 8.0, action="cold")) is None
    assert miss_of({"result": "cold", "reason": "no snapshot"}) is None
    assert miss_of({"plan": {"action": "restore", "fetch": {"bytes": "4", "seconds": 1}}}) is None
