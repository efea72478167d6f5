"""What each Thaw pod's start did, as Kubernetes Events on the pod (``kubectl describe pod``).

The workload container holds no API credentials (by design), so ``thaw exec`` leaves a copy of its
outcome file in the node cache (``<cache>/.outcomes/<pod uid>.json``, root-only like the cache), and
the node agent, which already has the cache and a ServiceAccount, turns each into Events:

| outcome | type | reason |
| --- | --- | --- |
| ``result: restored`` | Normal | ``ThawRestored`` |
| ``result: cold`` after a failed restore | Warning | ``ThawRestoreFailed`` |
| ``result: cold`` otherwise (no snapshot, incompatible, ...) | Normal | ``ThawColdStart`` |
| ``checkpoint.status: published`` | Normal | ``ThawCheckpointPublished`` |
| ``checkpoint.status: failed`` | Warning | ``ThawCheckpointFailed`` |
| ``checkpoint.status: skipped`` | Warning | ``ThawCheckpointSkipped`` |

An Event's name is derived from the pod, the container's start and the message, so the agent posting
it again (a restart of the agent) is answered 409 and changes nothing. ``outcome_specs`` and
``event_body`` are pure; ``write_outcome_copy`` (thaw exec, :mod:`thaw.snapshot.outcome_copy`) and
``node_events`` (the agent) are the file I/O around them; the agent posts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict

import orjson

from thaw.snapshot.outcome_copy import OUTCOMES_DIR

OUTCOME_MAX_AGE_S = 7 * 24 * 3600  # copies not updated for this long belong to pods long gone
MESSAGE_MAX = 1024  # what kubectl shows comfortably; the API allows more
COMPONENT = "thaw"


class ObjectRef(TypedDict):
    apiVersion: str
    kind: str
    name: str
    namespace: str
    uid: str
    fieldPath: str


class EventSpec(TypedDict):
    type: str  # Normal | Warning
    reason: str
    message: str


def outcome_specs(outcome: Mapping[str, Any]) -> list[EventSpec]:
    """The Events an outcome file calls for: how the container started, and how its checkpoint went
    (none while either is still under way)."""
    out: list[EventSpec] = []
    result, reason = outcome.get("result"), str(outcome.get("reason") or "")
    if result == "restored":
        snap = str((outcome.get("plan") or {}).get("snapshot", ""))
        out.append({"type": "Normal", "reason": "ThawRestored", "message": restored_message(snap, outcome)})
    elif result == "cold" and reason.startswith("restore failed"):
        out.append({"type": "Warning", "reason": "ThawRestoreFailed", "message": f"{reason}; started cold"})
    elif result == "cold":
        out.append(
            {"type": "Normal", "reason": "ThawColdStart", "message": f"cold start: {reason or 'no plan'}"}
        )
    ck = outcome.get("checkpoint")
    if isinstance(ck, Mapping):
        status, why = ck.get("status"), str(ck.get("reason") or "")
        if status == "published":
            size = ck.get("bytes")
            gb = f" ({size / 1e9:.2f} GB)" if isinstance(size, int) else ""
            took = f" in {ck['publish_s']} s" if "publish_s" in ck else ""
            msg = f"published snapshot {ck.get('snapshot', '?')}{gb}{took}"
            out.append({"type": "Normal", "reason": "ThawCheckpointPublished", "message": msg})
        elif status == "failed":
            msg = why + (
                "; the workload was stopped, the container restarts cold"
                if ck.get("stopped_workload")
                else ""
            )
            out.append({"type": "Warning", "reason": "ThawCheckpointFailed", "message": msg})
        elif status == "skipped":
            out.append({"type": "Warning", "reason": "ThawCheckpointSkipped", "message": why})
    return [{**s, "message": s["message"][:MESSAGE_MAX]} for s in out]


def restored_message(snapshot: str, outcome: Mapping[str, Any]) -> str:
    t = outcome.get("timings") or {}
    parts = [f"{label} {t[key]} s" for key, label in _TIMING_LABELS if key in t]
    took = f" in {t['total_s']} s" if "total_s" in t else ""
    return f"restored snapshot {snapshot}{took}" + (f" ({', '.join(parts)})" if parts else "")


_TIMING_LABELS = (
    ("criu_restore_s", "CRIU"),
    ("cuda_restore_s", "CUDA"),
    ("wake_s", "wake"),
    ("ready_s", "ready"),
)


def event_body(
    spec: EventSpec, outcome: Mapping[str, Any], uid: str, node: str, now: str
) -> dict[str, Any] | None:
    """A core/v1 Event on the outcome's pod, or None when the outcome does not name its pod (a
    container the webhook did not inject)."""
    pod = outcome.get("pod") or {}
    name, namespace = pod.get("name"), pod.get("namespace")
    if not name or not namespace or not uid:
        return None
    started = str(outcome.get("started", ""))
    digest = hashlib.sha256(f"{uid}\0{started}\0{spec['reason']}\0{spec['message']}".encode()).hexdigest()
    ref: ObjectRef = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "fieldPath": f"spec.containers{{{pod.get('container') or 'main'}}}",
    }
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name[:200]}.thaw.{digest[:16]}", "namespace": namespace},
        "involvedObject": ref,
        "type": spec["type"],
        "reason": spec["reason"],
        "message": spec["message"],
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": f"{COMPONENT}-agent",
        "reportingInstance": node,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def node_events(cache: Path, node: str, now: float | None = None) -> Iterator[dict[str, Any]]:
    """Every Event the outcome copies in ``cache`` call for (unreadable copies are skipped: a copy
    being replaced is read whole next time). Copies older than OUTCOME_MAX_AGE_S are removed."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    try:
        entries = sorted((cache / OUTCOMES_DIR).iterdir())
    except OSError:
        return
    for f in entries:
        try:
            if now - f.stat().st_mtime > OUTCOME_MAX_AGE_S:  # a pod long gone, or a dead writer's temp
                f.unlink(missing_ok=True)
                continue
            if f.suffix != ".json" or f.name.startswith("."):
                continue
            outcome = orjson.loads(f.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if not isinstance(outcome, dict):
            continue
        for spec in outcome_specs(outcome):
            body = event_body(spec, outcome, f.stem, node, stamp)
            if body is not None:
                yield body
