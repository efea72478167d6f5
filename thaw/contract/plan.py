"""The restore plan: what ``thaw fetch`` (init container) tells ``thaw exec`` (the workload's wrapper).

JSON in a file on a shared ``emptyDir`` (DESIGN.md, "Command line"):
``{"action": "restore", "path": DIR, "snapshot": ID}`` or ``{"action": "cold", "reason": TEXT}``.
Reading never raises: a missing, unreadable or malformed plan is itself a reason to cold-start, and a
restore must never crash-loop a pod.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

import orjson

from thaw.contract.safeio import read_bounded, write_atomic

Action = Literal["restore", "cold"]
MAX_PLAN_BYTES = 64 * 1024  # a plan is a few hundred bytes; anything larger is not ours


class FetchRecord(TypedDict):
    """What staging the snapshot took: bytes copied from the store (0: it was in the node cache
    already) and the seconds spent. The outcome carries the plan, so the agent counts cache hits,
    misses and fetch throughput from it (thaw/node/metrics.py)."""

    bytes: int
    seconds: float


class Plan(TypedDict):
    action: Action
    path: NotRequired[str]  # restore: the snapshot directory in the node cache (CRIU images + manifest.json)
    snapshot: NotRequired[str]  # restore: the snapshot id, "sha256:<hex>"
    reason: NotRequired[str]  # cold: why there is no restore, for people
    fetch: NotRequired[FetchRecord]  # restore: what thaw fetch copied (absent in plans written by hand)


def restore_plan(path: Path | str, snapshot_id: str, fetch: FetchRecord | None = None) -> Plan:
    plan: Plan = {"action": "restore", "path": str(path), "snapshot": snapshot_id}
    if fetch is not None:
        plan["fetch"] = fetch
    return plan


def parse_fetch_record(value: object) -> FetchRecord | None:
    """A well-formed fetch record, else None (it only feeds metrics: never a reason to go cold)."""
    if not isinstance(value, dict):
        return None
    n, s = value.get("bytes"), value.get("seconds")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        return None
    if isinstance(s, bool) or not isinstance(s, int | float) or s < 0:
        return None
    return {"bytes": n, "seconds": float(s)}


def cold_plan(reason: str) -> Plan:
    return {"action": "cold", "reason": reason}


def write_plan(path: Path, plan: Plan) -> None:
    """Write ``plan`` atomically: a reader sees the old file, no file, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0644: the workload container may run as another user than the init container.
    write_atomic(path, orjson.dumps(plan, option=orjson.OPT_SORT_KEYS) + b"\n", mode=0o644, fsync=True)


def parse_plan(raw: bytes) -> Plan:
    """A plan from its bytes; malformed input becomes a cold plan that says what was wrong."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return cold_plan(f"restore plan is not JSON ({exc})")
    if not isinstance(value, dict):
        return cold_plan(f"restore plan must be a JSON object, got {type(value).__name__}")
    action = value.get("action")
    if action == "cold":
        reason = value.get("reason")
        return cold_plan(reason if isinstance(reason, str) and reason else "cold start (no reason given)")
    if action == "restore":
        path, snap = value.get("path"), value.get("snapshot")
        if not isinstance(path, str) or not path.startswith("/"):
            return cold_plan(f"restore plan has no absolute 'path' (got {path!r})")
        if not isinstance(snap, str) or not snap.startswith("sha256:"):
            return cold_plan(f"restore plan has no 'snapshot' id of the form sha256:<hex> (got {snap!r})")
        return restore_plan(path, snap, parse_fetch_record(value.get("fetch")))
    return cold_plan(f"restore plan action must be 'restore' or 'cold', got {action!r}")


def read_plan(path: Path | None) -> Plan:
    """The plan at ``path``; never raises (no path, missing, unreadable or malformed -> cold)."""
    if path is None:
        return cold_plan("no restore plan given (--plan): cold start")
    try:
        raw = read_bounded(path, MAX_PLAN_BYTES)
    except FileNotFoundError:
        return cold_plan(f"no restore plan at {path} (thaw fetch did not run or did not finish)")
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            return cold_plan(f"restore plan {path} is larger than {MAX_PLAN_BYTES} bytes")
        return cold_plan(f"cannot read restore plan {path}: {exc.strerror or exc}")
    return parse_plan(raw)
