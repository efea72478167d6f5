"""The node cache inventory (``thaw.dev/cache`` Node annotation, DESIGN.md).

Written by the node agent, read by the extender and ``thaw status``. Pure functions: parse (with a
reason for anything malformed), render (kept under the annotation budget by dropping the least
recently used entries first, so a node never advertises more than it says it holds), and the
node's fetch throughput from its recent misses (:func:`fetch_rate`, the optional ``fetch`` field).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, Literal, NotRequired, TypedDict

import orjson

INVENTORY_VERSION = 1
MAX_ANNOTATION_BYTES = 64 * 1024
Tier = Literal["memory", "disk"]
TIERS: tuple[Tier, ...] = ("memory", "disk")
# The fetch field: the median of the node's last FETCH_SAMPLES misses of at least FETCH_MIN_BYTES
# (a small copy is all fixed cost: its rate says nothing about the store's throughput).
FETCH_SAMPLES = 8
FETCH_MIN_BYTES = 64 * 2**20
MAX_FETCH_BPS = 10**12  # 1 TB/s: more is not a measurement


class CachedSnapshot(TypedDict):
    name: str
    id: str
    workload: str
    compat: str
    bytes: int
    tier: Tier
    last_used: str  # RFC 3339, UTC


class FetchRate(TypedDict):
    """The node's recent fetch throughput: what ``thaw fetch`` took to stage a snapshot from the
    store into this node's cache (the restore plan's ``fetch: {bytes, seconds}``), per miss."""

    bps: int  # bytes per second, the median of the misses below
    n: int  # how many misses (1..FETCH_SAMPLES, the most recent)


class Inventory(TypedDict):
    v: int
    free_bytes: int
    snapshots: list[CachedSnapshot]
    restoring: NotRequired[int]  # restores in progress on the node (the extender's queue signal)
    fetch: NotRequired[FetchRate]  # absent until the node has fetched something big enough


class InventoryError(ValueError):
    """A ``thaw.dev/cache`` value that is not the documented shape; the message says where."""


def _check_entry(i: int, e: Any) -> CachedSnapshot:
    if not isinstance(e, dict):
        raise InventoryError(f"snapshots[{i}] must be an object")
    for key in ("name", "id", "workload", "compat", "last_used"):
        if not isinstance(e.get(key), str):
            raise InventoryError(f"snapshots[{i}].{key} must be a string")
    size = e.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InventoryError(f"snapshots[{i}].bytes must be an integer >= 0")
    if e.get("tier") not in TIERS:
        raise InventoryError(f"snapshots[{i}].tier must be one of {', '.join(TIERS)}, got {e.get('tier')!r}")
    return e  # type: ignore[return-value]  # shape checked above


def parse_inventory(raw: str | bytes) -> Inventory:
    """Parse a ``thaw.dev/cache`` annotation value, or raise InventoryError saying what is wrong."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InventoryError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InventoryError("must be a JSON object")
    if value.get("v") != INVENTORY_VERSION:
        raise InventoryError(
            f"unsupported version v={value.get('v')!r} (this Thaw reads v={INVENTORY_VERSION})"
        )
    free = value.get("free_bytes")
    if not isinstance(free, int) or isinstance(free, bool) or free < 0:
        raise InventoryError("free_bytes must be an integer >= 0")
    snaps = value.get("snapshots")
    if not isinstance(snaps, list):
        raise InventoryError("snapshots must be a list")
    restoring = value.get("restoring", 0)
    if not isinstance(restoring, int) or isinstance(restoring, bool) or restoring < 0:
        raise InventoryError("restoring must be an integer >= 0")
    inv: Inventory = {
        "v": INVENTORY_VERSION,
        "free_bytes": free,
        "snapshots": [_check_entry(i, e) for i, e in enumerate(snaps)],
    }
    if restoring:
        inv["restoring"] = restoring
    if "fetch" in value:
        inv["fetch"] = _check_fetch(value["fetch"])
    return inv


def _is_int(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _check_fetch(value: Any) -> FetchRate:
    if (
        not isinstance(value, dict)
        or not _is_int(value.get("bps"), 1, MAX_FETCH_BPS)
        or not _is_int(value.get("n"), 1, FETCH_SAMPLES)
    ):
        raise InventoryError(
            f'fetch must be {{"bps": integer 1..{MAX_FETCH_BPS}, "n": integer 1..{FETCH_SAMPLES}}}, '
            f"got {str(value)[:120]}"
        )
    return {"bps": value["bps"], "n": value["n"]}


def fetch_rate(misses: Iterable[tuple[int, float]]) -> FetchRate | None:
    """The ``fetch`` field from the node's misses, oldest first, each (bytes copied, seconds): the
    median throughput of the last FETCH_SAMPLES of at least FETCH_MIN_BYTES. None without one.
    The median, not a mean: one fetch slowed by a busy link or a cold registry cache does not move
    it, and half the recent misses must be slow before it says the store is slow."""
    rates = [n / s for n, s in misses if n >= FETCH_MIN_BYTES and s > 0][-FETCH_SAMPLES:]
    if not rates:
        return None
    bps = min(MAX_FETCH_BPS, max(1, round(statistics.median(rates))))
    return {"bps": bps, "n": len(rates)}


def render_inventory(inv: Inventory, limit: int = MAX_ANNOTATION_BYTES) -> str:
    """The annotation value, most recently used snapshots first, trimmed to ``limit`` bytes."""
    snaps = sorted(inv["snapshots"], key=lambda s: s["last_used"], reverse=True)
    while True:
        out = orjson.dumps({**inv, "snapshots": snaps})
        if len(out) <= limit or not snaps:
            return out.decode()
        snaps = snaps[:-1]
