"""What each Thaw pod's start did, as Kubernetes Events on the pod (``kubectl describe pod``).

The workload container holds no API credentials (by design), so its outcome file is relayed into the
node cache (``<cache>/.outcomes/<pod uid>.json``, root-only like the cache), and the node agent,
which already has the cache and a ServiceAccount, turns each into Events:

| outcome | type | reason |
| --- | --- | --- |
| ``result: restored`` | Normal | ``ThawRestored`` |
| ``result: cold`` after a failed restore | Warning | ``ThawRestoreFailed`` |
| ``result: cold``, the snapshot ``unsigned:``/``untrusted:`` | Warning | ``ThawSnapshotUntrusted`` |
| ``result: cold`` otherwise (no snapshot, incompatible, ...) | Normal | ``ThawColdStart`` |
| ``checkpoint.status: published`` | Normal | ``ThawCheckpointPublished`` |
| ``checkpoint.status: failed`` | Warning | ``ThawCheckpointFailed`` |
| ``checkpoint.status: skipped`` | Warning | ``ThawCheckpointSkipped`` |

Only for pods that the agent's own API list shows on its node, matched by the copy's uid (its file
name): the pod's name, namespace and containers come from that API object, never from the file, so
an outcome file can only ever speak about its own pod. Copies are read bounded
(thaw.snapshot.outcome_copy.read_outcome_copies). An Event's name is derived from the pod, the
container's start and the message, so the agent posting it again (a restart of the agent) is
answered 409 and changes nothing. ``outcome_specs``, ``pod_ref`` and ``event_body`` are pure;
``node_events`` is the file I/O around them; the agent lists the pods and posts.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypedDict

from thaw.contract.annotations import CONTAINER, INJECTED
from thaw.snapshot.outcome_copy import read_outcome_copies, remove_outcome_copy

OUTCOME_MAX_AGE_S = 7 * 24 * 3600  # copies not updated for this long belong to pods long gone
ORPHAN_AGE_S = 600  # a copy of a pod not on this node (gone) is removed after this long
MESSAGE_MAX = 1024  # what kubectl shows comfortably; the API allows more
COMPONENT = "thaw"


class ObjectRef(TypedDict):
    apiVersion: str
    kind: str
    name: str
    namespace: str
    uid: str
    fieldPath: str


class PodRef(TypedDict):
    """A pod as the agent's API list shows it."""

    name: str
    namespace: str
    uid: str
    containers: list[str]
    target: str  # the container Thaw wraps: thaw.dev/container, else the first


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
    elif result == "cold" and reason.startswith(("unsigned:", "untrusted:")):
        # A snapshot exists but this namespace cannot verify it: every replica will cold-start until
        # the trust (or the signing key) is fixed, so say it loudly, with what to do.
        fix = (
            "put the signer's signing.pub into this namespace's trust Secret (thaw-trust) and give "
            "checkpointing pods the signing key (thaw-signing-key); `thaw check cluster` says which "
            "is missing"
        )
        out.append(
            {"type": "Warning", "reason": "ThawSnapshotUntrusted", "message": f"cold start: {reason}. {fix}"}
        )
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


def pod_ref(pod: Mapping[str, Any]) -> PodRef | None:
    """A Thaw pod (``thaw.dev/injected``) of an API list (a dict as the API serves it), else None."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    name, namespace, uid = meta.get("name"), meta.get("namespace"), meta.get("uid")
    if INJECTED not in annotations or not (
        isinstance(name, str) and isinstance(namespace, str) and isinstance(uid, str) and name and uid
    ):
        return None
    containers = [
        str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name")
    ]
    target = annotations.get(CONTAINER)
    if target not in containers:
        target = containers[0] if containers else "main"
    return {"name": name, "namespace": namespace, "uid": uid, "containers": containers, "target": target}


def event_body(
    spec: EventSpec, outcome: Mapping[str, Any], pod: PodRef, node: str, now: str
) -> dict[str, Any]:
    """A core/v1 Event on ``pod`` (identity from the API object; the outcome gives only the
    message and the container's start)."""
    name, namespace, uid = pod["name"], pod["namespace"], pod["uid"]
    started = str(outcome.get("started", ""))
    digest = hashlib.sha256(f"{uid}\0{started}\0{spec['reason']}\0{spec['message']}".encode()).hexdigest()
    ref: ObjectRef = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "fieldPath": f"spec.containers{{{pod['target']}}}",
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


def node_events(
    cache: Path, node: str, pods: Mapping[str, PodRef], now: float | None = None
) -> Iterator[dict[str, Any]]:
    """Every Event the outcome copies in ``cache`` call for, for the pods in ``pods`` (by uid: this
    node's Thaw pods from the API). Copies of pods not there are skipped, and removed once
    ORPHAN_AGE_S old (the pod is gone); copies older than OUTCOME_MAX_AGE_S are removed."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    for uid, outcome, mtime in read_outcome_copies(cache, OUTCOME_MAX_AGE_S, now):
        pod = pods.get(uid)
        if pod is None:
            if now - mtime > ORPHAN_AGE_S:
                remove_outcome_copy(cache, uid)
            continue
        for spec in outcome_specs(outcome):
            yield event_body(spec, outcome, pod, node, stamp)


def unverified_specs(cache: Path, now: float | None = None) -> Iterator[tuple[str, EventSpec]]:
    """(pod uid, spec) of every copy, for a dry run without the API: nothing is posted from these."""
    now = time.time() if now is None else now
    for uid, outcome, _ in read_outcome_copies(cache, OUTCOME_MAX_AGE_S, now):
        for spec in outcome_specs(outcome):
            yield uid, spec
