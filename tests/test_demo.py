"""``thaw demo`` end to end (real webhook, real extender, real CRIU where this machine allows it), its
pure parts, its fallback without CRIU, and its cleanup on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.demo import bump_restoring, place_pods
from extender.synthetic import cached, node
from tests.webhook.helpers import answer
from thaw.contract.inventory import parse_inventory
from thaw.dev import demo, demo_node
from thaw.dev.demo import DemoContext, print_summary
from thaw.dev.sandbox import REPO, STANDIN, missing_prerequisites

WHY_NO_CRIU = missing_prerequisites()


def _run_steps(ctx: DemoContext) -> None:
    for _, step in demo.STEPS:
        step(ctx)
    print_summary(ctx)


def _netns() -> set[str]:
    """The demo's network namespaces (other tests, maybe running beside, name theirs otherwise)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith("thaw-demo-")}


def _standins() -> list[int]:
    """PIDs of the demo's stand-in servers still running (its port: tests beside use others)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(STANDIN).encode() in cmdline and f"\0{demo_node.PORT}\0".encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_map_env_maps_mounts_and_downward_api(tmp_path: Path) -> None:
    env: list[dict[str, Any]] = [
        {"name": "THAW_CACHE", "value": "/var/lib/thaw/cache"},
        {"name": "THAW_PLAN", "value": "/run/thaw/plan/plan.json"},
        {"name": "THAW_KEY", "value": "/etc/thaw/key/signing.key"},
        {"name": "THAW_CRIU", "value": "/thaw/rt/bin/criu"},
        {"name": "THAW_RUNTIME_DIR", "value": "/var/lib/thaw/runtime"},
        {"name": "THAW_READY", "value": "http://127.0.0.1:8000/health"},
        {"name": "THAW_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "HOME", "value": "/tmp"},
    ]
    out = demo_node.map_env(env, tmp_path / "node", tmp_path / "pod", {"spec.nodeName": "gpu-local"})
    assert out == {
        "THAW_CACHE": str(tmp_path / "node/cache"),
        "THAW_PLAN": str(tmp_path / "pod/run/plan/plan.json"),
        "THAW_KEY": str(tmp_path / "node/keys/signing.key"),
        "THAW_CRIU": str(tmp_path / "pod/tools/rt/bin/criu"),
        "THAW_RUNTIME_DIR": str(tmp_path / "node/runtime"),
        "THAW_READY": "http://127.0.0.1:8000/health",
        "THAW_NODE_NAME": "gpu-local",
    }
    # the pod's own snapshots, inside the cache's hostPath; the image's runtime; nothing else moves
    node, pod = tmp_path / "node", tmp_path / "pod"
    assert demo_node.map_path("/var/lib/thaw/cache/ns/snap", node, pod) == str(node / "cache/ns/snap")
    assert demo_node.map_path("/opt/thaw/bin/thaw", node, pod) == str(node / "bundle/bin/thaw")
    assert demo_node.map_path("/thawed", node, pod) == "/thawed"


def test_the_demo_runs_each_container_as_the_webhook_injects_it() -> None:
    """Commands, env and mounts come from the mutated pod, so the demo cannot drift from the webhook:
    the workload's mounts are the plan, work, runtime and its own snapshots, the snapshots read-only;
    the sidecar has the key; nobody else does."""
    from tests.webhook.helpers import apply
    from webhook.config import parse_config

    config = parse_config(yaml.safe_load(demo.DEMO_CONFIG))
    review = demo.admission_review(
        demo.vllm_pod("qwen", demo.RESTORE_NS, {"thaw.dev/snapshot": "s"}), "ns", "u"
    )
    _, out = answer(review, restore=True, config=config)
    pod = apply(review["request"]["object"], out["response"])
    c = demo_node.pod_containers(pod)
    node, mine = Path("/n"), Path("/p")
    binds = dict(demo_node.volume_binds(c.target, node, mine))
    assert binds == {
        "/p/tools": True,
        "/n/runtime": True,
        "/p/run/plan": True,
        "/p/run/work": False,
        "/n/cache/ns/s": True,
    }
    assert ("/n/keys", True) in demo_node.volume_binds(c.sidecar, node, mine)
    for other in (c.tools, c.fetch, c.target):
        assert "/n/keys" not in dict(demo_node.volume_binds(other, node, mine))
    assert c.tools["command"][-1] == "install-runtime" and c.sidecar["command"][-1] == "sidecar"


def test_bump_restoring_counts_one_more_restore() -> None:
    doc: dict[str, Any] = {
        "metadata": {"resourceVersion": "4"},
        "items": [node("a", snapshots=[cached("m", 10, "disk")]), node("b", facts=None)],
    }
    assert bump_restoring(doc, "a") and bump_restoring(doc, "a")
    inv = parse_inventory(doc["items"][0]["metadata"]["annotations"]["thaw.dev/cache"])
    assert inv.get("restoring") == 2 and doc["metadata"]["resourceVersion"] == "6"
    assert not bump_restoring(doc, "b")  # no cache annotation: no queue to report
    assert not bump_restoring(doc, "nope")


def test_replicas_spread_as_restore_queues_grow() -> None:
    """gpu-a holds the snapshot in page cache, gpu-b on disk: without the extender's count of the
    pods it placed (the agents report a pass late) every replica would land on gpu-a."""
    snap = cached(demo.SNAPSHOT, 8_100_000_000, "memory")
    cluster = {
        "kind": "NodeList",
        "metadata": {"resourceVersion": "1"},
        "items": [
            node("gpu-a", snapshots=[snap]),
            node("gpu-b", snapshots=[cached(demo.SNAPSHOT, 8_100_000_000, "disk")]),
            node("gpu-c", snapshots=[]),
        ],
    }
    from extender.demo import example_pods

    pods = example_pods(4)
    for p in pods:
        p["metadata"]["annotations"]["thaw.dev/workload"] = snap["workload"]
    spread = [p.node for p in place_pods(pods, out=lambda _: None, cluster=cluster)]
    assert set(spread[:2]) == {"gpu-a", "gpu-b"}, spread
    piled = [p.node for p in place_pods(pods, out=lambda _: None, cluster=cluster, spread=False)]
    assert set(piled) == {"gpu-a"}, piled


def test_without_criu_the_demo_says_what_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_node, "missing_prerequisites", lambda: "needs root (pretend)")
    lines: list[str] = []
    ctx = DemoContext(workdir=tmp_path, out=lines.append)
    _run_steps(ctx)
    text = "\n".join(lines)
    assert ctx.failures == 0, text
    assert "SKIPPED the real runtime (cold start, checkpoint, restore): needs root (pretend)" in text
    assert ctx.cold is None and ctx.restored is None
    assert ctx.node_annotations  # thaw agent --once still ran, on an empty cache
    assert len(ctx.placements) == demo.REPLICAS
    # This machine's node holds nothing: a replica placed there would fetch, never hit.
    assert all(p.tier == "fetch" for p in ctx.placements if p.node == demo_node.LOCAL_NODE)
    assert any(r.step == "restore" and r.outcome == "skipped" for r in ctx.rows)


@pytest.mark.criu
@pytest.mark.skipif(WHY_NO_CRIU is not None, reason=WHY_NO_CRIU or "")
def test_demo_checkpoints_places_and_restores_for_real(tmp_path: Path) -> None:
    before = _netns()
    lines: list[str] = []
    ctx = DemoContext(workdir=tmp_path, out=lines.append)
    _run_steps(ctx)
    text = "\n".join(lines)
    assert ctx.failures == 0, text
    assert ctx.cold is not None and ctx.restored is not None
    assert ctx.cold.plan["action"] == "cold" and ctx.cold.plan["reason"].startswith("no snapshot:")
    assert ctx.cold.outcome["checkpoint"]["status"] == "published"
    assert ctx.restored.plan["action"] == "restore"
    assert ctx.restored.plan["snapshot"] == ctx.cold.outcome["checkpoint"]["snapshot"]
    assert ctx.restored.outcome["result"] == "restored", ctx.restored.outcome
    # the demo's pods use sleep mode: the checkpoint was taken asleep, the replica woken
    assert ctx.cold.outcome["checkpoint"]["wake_s"] >= 0 and ctx.restored.outcome["timings"]["wake_s"] >= 0
    assert ctx.restored.answer is not None and ctx.cold.answer is not None
    assert ctx.restored.answer["digest"] == ctx.cold.answer["digest"]
    # The agent's inventory is what the extender saw for this machine's node.
    inv = parse_inventory(ctx.node_annotations["thaw.dev/cache"])
    assert [s["id"] for s in inv["snapshots"]] == [ctx.cold.outcome["checkpoint"]["snapshot"]]
    # This machine's node holds the snapshot it took, so the extender ranks it as a cache hit and
    # some replica lands there (a node holding it in memory may rightly come first).
    local = [p for p in ctx.placements if p.node == demo_node.LOCAL_NODE]
    assert local and local[0].tier in ("memory", "disk")
    # Spread: the replicas use more than one of the nodes that hold the snapshot.
    assert len({p.node for p in ctx.placements}) >= 3
    for command in (
        "thaw keys generate",
        "thaw agent --once",
        "thaw install-runtime",
        "thaw fetch",
        "thaw sidecar",
        "/thaw/rt/bin/thaw exec --",
    ):
        assert f"$ {command}" in text, command
    # thaw-sidecar published (the only container with the key), thaw exec restored from the
    # snapshot through its read-only mount
    assert ctx.cold.outcome["checkpoint"]["bytes"] > 0
    # The agent's Events, from the outcomes thaw-sidecar relayed into the node cache.
    for event in ("ThawColdStart", "ThawCheckpointPublished", "ThawRestored"):
        assert re.search(rf"event: \w+ {event}", text), event
    assert "Time to ready on this machine" in text and "every case behaved as expected" in text
    assert _netns() == before and not _standins()


@pytest.mark.criu
@pytest.mark.skipif(WHY_NO_CRIU is not None, reason=WHY_NO_CRIU or "")
def test_ctrl_c_leaves_no_process_and_no_namespace() -> None:
    before = _netns()
    proc = subprocess.Popen(
        [sys.executable, "-m", "thaw", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert proc.stdout is not None
    seen = []
    for raw in proc.stdout:
        seen.append(raw.decode(errors="replace"))
        if "/thaw/rt/bin/thaw exec --" in seen[-1]:  # the cold pod starts: sidecar, netns, server live
            break
    deadline = time.monotonic() + 15  # the server starts within a second, later under load
    while not _standins() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _standins(), "".join(seen)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C goes to the whole foreground group
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    # the pods' processes and namespaces go within seconds; on a loaded 2-core box it took over 10
    deadline = time.monotonic() + 30
    while (_standins() or _netns() != before) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _standins() and _netns() == before


def test_demo_lines_are_short_and_the_summary_is_a_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14.8: no line over demo.WIDTH (a word longer than that, a path, stays whole on its own
    line), no dump of a container's THAW_* values, the work directory as $DEMO, snapshot ids short,
    and a summary of the pods in columns."""
    monkeypatch.setattr(demo_node, "missing_prerequisites", lambda: "needs root (pretend)")
    lines: list[str] = []
    ctx = DemoContext(workdir=tmp_path, out=lines.append)
    _run_steps(ctx)
    text = "\n".join(lines)
    for line in text.splitlines():
        assert len(line) <= demo.WIDTH or len(line.split()) == 1, line
    # the env that matters is named (the webhook step's five); no container's whole env is dumped
    assert "THAW_PLAN=" not in text and "THAW_CACHE=" not in text and "THAW_POD_UID=" not in text
    assert str(tmp_path) not in text and "$DEMO/node/keys" in text
    assert not re.search(r"[0-9a-f]{64}", text)
    header = next(line for line in lines if line.split()[:2] == ["pod", "node"])
    assert header.split() == ["pod", "node", "what", "happened", "ready", "why"], header
    rows = lines[lines.index(header) + 1 :]
    placed = [r for r in rows if "placed, not run" in r]
    assert len(placed) == demo.REPLICAS, rows  # nothing restored here: every replica only placed
    assert "every case behaved as expected" in text


def test_table_wraps_its_last_column_and_ids_are_shortened() -> None:
    rows = [("a", "x" * 10, "one two three four five six seven eight nine ten")]
    out = demo.table(("name", "value", "why"), rows, width=46)
    assert all(len(line) <= 46 for line in out) and len(out) == 3, out
    assert out[0].split() == ["name", "value", "why"] and out[1].startswith("  a     xxxxxxxxxx  one")
    assert out[2] == " " * 20 + "six seven eight nine ten"
    digest = "ab" * 32
    assert demo.short_ids(f"sha256:{digest} in /c/{digest}") == f"sha256:{digest[:12]}… in /c/{digest[:12]}…"
    assert demo.wrap_line("  " + "word " * 30, width=40).splitlines()[1].startswith("      word")
