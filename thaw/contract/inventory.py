"""The node cache inventory (``thaw.dev/cache`` Node annotation, DESIGN.md).

Written by the node agent, read by the extender and ``thaw status``. Pure functions: parse (with a
reason for anything malformed) and render (kept under the annotation budget by dropping the least
recently used entries first, so a node never advertises more than it says it holds).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson

INVENTORY_VERSION = 1
MAX_ANNOTATION_BYTES = 64 * 1024
Tier = Literal["memory", "disk"]
TIERS: tuple[Tier, ...] = ("memory", "disk")


class CachedSnapshot(TypedDict):
    name: str
    id: str
    workload: str
    compat: str
    bytes: int
    tier: Tier
    last_used: str  # RFC 3339, UTC


class Inventory(TypedDict):
    v: int
    free_bytes: int
    snapshots: list[CachedSnapshot]
    restoring: NotRequired[int]  # restores in progress on the node (the extender's queue signal)


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
    return inv


def render_inventory(inv: Inventory, limit: int = MAX_ANNOTATION_BYTES) -> str:
    """The annotation value, most recently used snapshots first, trimmed to ``limit`` bytes."""
    snaps = sorted(inv["snapshots"], key=lambda s: s["last_used"], reverse=True)
    while True:
        out = orjson.dumps({**inv, "snapshots": snaps})
        if len(out) <= limit or not snaps:
            return out.decode()
        snaps = snaps[:-1]
