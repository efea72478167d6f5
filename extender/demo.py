"""The extender's step of ``thaw demo``: place the pods the webhook mutated on a small GPU cluster.

``place_pods(pods)`` writes a NodeList of six simulated GPU nodes (two cache the snapshot, one of
them busy restoring; one is empty but compatible; one is an H200 with other facts; one has only GPU
Feature Discovery labels), starts ``thaw extender --nodes FILE`` (real gunicorn), asks it
``/filter`` and ``/prioritize`` for each pod as kube-scheduler would (``nodeCacheCapable``), binds
the pod to the best node (ties to the one with fewest of these pods, as the scheduler's default
spreading does), and prints node, tier and estimated time-to-ready against a cold start.
The extender counts each pod it places as a restore in progress on that node, so the next pods
spread over the other nodes at once. The node agents' own report of it (``restoring`` in
``thaw.dev/cache``) is played with their lag: it reaches the ``--nodes`` file (which the extender
reloads) only ``agent_lag_s`` (one agent pass, 30 s) after the bind, so a burst of pods never sees
it, as in a cluster. Run alone: ``python -m extender.demo``.
"""

from __future__ import annotations

import copy
import http.client
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extender.index import NodeIndex
from extender.launch import extender_command, start_ready
from extender.scoring import DEFAULT_PARAMS, Params
from extender.synthetic import H100_FACTS, H200_FACTS, WORKLOAD, cached, node
from thaw.contract.annotations import NODE_CACHE
from thaw.contract.inventory import parse_inventory, render_inventory
from thaw.contract.safeio import write_atomic
from thaw.serve.serving import free_port

SNAPSHOT = "qwen3-8b-vllm"
SIZE = 8_100_000_000
AGENT_LAG_S = 30.0  # the node agent's pass (thaw agent --interval): how late restoring is reported


@dataclass(frozen=True)
class Placement:
    pod: str
    node: str
    tier: str
    seconds: float
    cold_seconds: float
    score: int


def demo_cluster(snapshot: str = SNAPSHOT, workload: str = WORKLOAD) -> dict[str, Any]:
    def snap(tier: str) -> Any:
        return cached(snapshot, SIZE, tier, workload=workload)  # type: ignore[arg-type]

    items = [
        node("gpu-a", snapshots=[snap("memory")]),
        node("gpu-b", snapshots=[snap("disk")]),
        node("gpu-c", snapshots=[snap("memory")], restoring=3),
        node("gpu-d", snapshots=[]),
        node("gpu-e", facts=H200_FACTS, snapshots=[]),
        node("gpu-f", facts=H100_FACTS, gfd=True),
    ]
    return {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": items}


def example_pods(n: int = 4, workload: str = WORKLOAD) -> list[dict[str, Any]]:
    """Pods as the webhook leaves them (annotations only: what the extender reads)."""
    return [
        {
            "metadata": {
                "name": f"qwen-{i}",
                "namespace": "inference",
                "annotations": {
                    "thaw.dev/snapshot": SNAPSHOT,
                    "thaw.dev/injected": "true",
                    "thaw.dev/workload": workload,
                    "thaw.dev/placement": "required" if i % 2 else "preferred",
                },
            },
            "spec": {"containers": [{"name": "server", "image": "vllm/vllm-openai:v0.11.0"}]},
        }
        for i in range(n)
    ]


def _post(port: int, path: str, body: dict[str, Any]) -> Any:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = c.getresponse()
    data = json.loads(resp.read())
    if resp.status != 200:
        raise RuntimeError(f"extender {path}: HTTP {resp.status}: {data}")
    return data


def bump_restoring(doc: dict[str, Any], node_name: str) -> bool:
    """Count one more restore in progress on ``node_name`` (its ``thaw.dev/cache`` ``restoring``), as
    the node's agent reports while a bound pod restores; a new resourceVersion. Whether it applied
    (a node without a cache annotation has no queue to report)."""
    rv = int((doc.get("metadata") or {}).get("resourceVersion") or "1") + 1
    doc.setdefault("metadata", {})["resourceVersion"] = str(rv)
    for item in doc["items"]:
        if item["metadata"]["name"] != node_name:
            continue
        ann = item["metadata"].get("annotations") or {}
        raw = ann.get(NODE_CACHE)
        if raw is None:
            return False
        inv = parse_inventory(raw)
        inv["restoring"] = inv.get("restoring", 0) + 1
        ann[NODE_CACHE] = render_inventory(inv)
        item["metadata"]["resourceVersion"] = str(rv)
        return True
    return False


def _write_atomic(path: Path, doc: dict[str, Any]) -> None:
    # The extender's reload sees the old file or the new one, never half.
    write_atomic(path, json.dumps(doc).encode(), mode=0o644)


def _wait_version(port: int, rv: str) -> None:
    """Until the extender serves the node view at resourceVersion ``rv`` (its file reload)."""
    deadline = time.monotonic() + 10
    want = f" at resourceVersion {rv}\n".encode()
    while time.monotonic() < deadline:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/readyz")
        if c.getresponse().read().endswith(want):
            return
        time.sleep(0.05)
    raise RuntimeError(f"thaw extender did not reload its --nodes file (resourceVersion {rv}) in 10 s")


def place_pods(
    pods: list[dict[str, Any]] | None = None,
    out: Callable[[str], None] = print,
    cluster: dict[str, Any] | None = None,
    spread: bool = True,
    scoring: dict[str, float] | None = None,
    *,
    agent_lag_s: float = AGENT_LAG_S,
) -> list[Placement]:
    """Place ``pods`` one after another on ``cluster`` (default :func:`demo_cluster`). With
    ``spread`` the extender counts the pods it placed (its default), so later pods see the queue and
    spread over the other nodes that hold the snapshot; without, it counts none
    (``placed_window_s: 0``, the extender before) and only the agents' reports could spread them.
    Each bind's report (``restoring`` + 1 in the ``--nodes`` file) is written ``agent_lag_s`` after
    it, before the next pod that comes that late. ``scoring``: ``--scoring`` constants
    (extender.scoring.Params fields)."""
    pods = pods if pods is not None else example_pods()
    doc = copy.deepcopy(cluster) if cluster is not None else demo_cluster(workload=_workload(pods))
    names = [n["metadata"]["name"] for n in doc["items"]]
    constants = dict(scoring or {})
    if not spread:
        constants["placed_window_s"] = 0.0
    params = Params(**constants) if constants else DEFAULT_PARAMS
    # The same view as the extender's, to print each placement's estimate (counts included).
    explain = NodeIndex(params)
    explain.replace_all(doc["items"], "1")
    placements: list[Placement] = []
    reports: list[tuple[float, str]] = []  # (when the node's agent reports the bind, node)
    with tempfile.TemporaryDirectory(prefix="thaw-demo-") as tmp:
        nodes_file = Path(tmp) / "nodes.json"
        _write_atomic(nodes_file, doc)
        extra: list[str] = []
        if constants:
            (Path(tmp) / "scoring.json").write_text(json.dumps(constants))
            extra = ["--scoring", str(Path(tmp) / "scoring.json")]
        port = free_port()
        proc = start_ready(extender_command(port, nodes_file, *extra), port, timeout_s=30)
        try:
            out(f"extender: thaw extender --nodes ({len(names)} GPU nodes) on 127.0.0.1:{port}")
            for i, asked in enumerate(pods):
                due = [node for t, node in reports if t <= time.monotonic()]
                reports = [(t, node) for t, node in reports if t > time.monotonic()]
                if any([bump_restoring(doc, node) for node in due]):
                    _write_atomic(nodes_file, doc)
                    _wait_version(port, doc["metadata"]["resourceVersion"])
                    explain.replace_all(doc["items"], doc["metadata"]["resourceVersion"])
                pod = copy.deepcopy(asked)
                meta = pod["metadata"]
                # Each pod is its own to the extender (a uid, as the API server gives every pod):
                # one asked about twice counts once.
                meta["uid"] = f"{meta.get('uid') or 'demo'}-{i}"
                ann = meta.get("annotations") or {}
                args = {"Pod": pod, "Nodes": None, "NodeNames": names}
                filtered = _post(port, "/filter", args)
                scores = _post(port, "/prioritize", {**args, "NodeNames": filtered["NodeNames"]})
                best = _bind(scores, filtered["NodeNames"], placements)
                memo = explain.decisions(ann["thaw.dev/snapshot"], ann["thaw.dev/workload"])
                d = memo.decision(best)
                # As the extender does: the pod counts on the nodes it scored highest.
                explain.note_placed(meta["uid"], memo.top(filtered["NodeNames"]))
                p = Placement(meta["name"], best, d.tier, d.seconds, d.cold_seconds, d.score)
                placements.append(p)
                failed = ", ".join(sorted(filtered["FailedNodes"])) or "none"
                out(
                    f"  {p.pod:<8} placement={ann.get('thaw.dev/placement', 'preferred'):<9} -> {p.node} "
                    f"(score {p.score}/10, {p.tier}): ready in ~{p.seconds:.1f} s vs cold start "
                    f"~{p.cold_seconds:.1f} s; filtered out: {failed}"
                )
                reports.append((time.monotonic() + agent_lag_s, best))
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    return placements


def _bind(scores: list[dict[str, Any]], feasible: list[str], placed: list[Placement]) -> str:
    """The node kube-scheduler would bind: the highest extender score (nothing else differs
    between these nodes), ties going to the node with fewest of these pods so far, as the default
    PodTopologySpread constraints spread a workload's replicas, then to the first asked about."""
    if not scores:
        return feasible[0]
    top = max(h["Score"] for h in scores)
    tied = [h["Host"] for h in scores if h["Score"] == top]
    return str(min(tied, key=lambda n: sum(1 for p in placed if p.node == n)))


def _workload(pods: list[dict[str, Any]]) -> str:
    for pod in pods:
        w = (pod["metadata"].get("annotations") or {}).get("thaw.dev/workload")
        if w:
            return str(w)
    return WORKLOAD


if __name__ == "__main__":
    place_pods()
