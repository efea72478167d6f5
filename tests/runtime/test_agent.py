"""``thaw agent`` through the CLI against tests/fakekube.py (the real client, the real wire format)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.fakekube import FakeKube, running
from tests.runtime.snapshots import FACTS, World, facts, kubeconfig, node
from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.canonical import canonical_json
from thaw.contract.facts import compat_key
from thaw.contract.inventory import parse_inventory
from thaw.dev.sandbox import thaw_cli, thaw_command, thaw_env
from thaw.snapshot.cache import MEMORY_FS, _fs_type

GIB = 1 << 30


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.setup_keys()
    return w


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with running() as k:
        k.add(
            node(
                "gpu-1",
                annotations={"team": "ml"},
                labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            )
        )
        k.add(node("gpu-2", annotations={"team": "web"}))
        yield k


def agent(
    world: World, kube: FakeKube, *extra: str, f: Any = FACTS, budget: int = GIB
) -> subprocess.CompletedProcess[str]:
    env = {"KUBECONFIG": str(kubeconfig(world.root / "kubeconfig", kube.url)), "THAW_NODE": "gpu-1"}
    return thaw_cli(
        "agent", "--cache", world.cache, "--budget", str(budget), "--facts", world.facts_for(f),
        "--once", *extra, env=env,
    )  # fmt: skip


def node_annotations(kube: FakeKube, name: str = "gpu-1") -> dict[str, str]:
    a: dict[str, str] = kube.nodes[name]["metadata"]["annotations"]
    return a


def cached(world: World, tag: str, name: str | None = None) -> dict[str, Any]:
    n = name or f"snap-{tag}"
    world.publish(world.images(tag, {"pages-1.img": os.urandom(100_000), "core-1.img": tag.encode()}), name=n)
    plan = world.fetch(name=n)
    assert plan["action"] == "restore", plan
    return plan


def hold(plan: dict[str, Any]) -> subprocess.Popen[str]:
    """A process holding a snapshot the way a restoring ``thaw exec`` does (hold_verified)."""
    p = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from thaw.snapshot.cache import hold_verified\n"
         "with hold_verified(Path(sys.argv[1]), sys.argv[2], time.monotonic() + 10):\n"
         "    print('held', flush=True); sys.stdin.read()", plan["path"], plan["snapshot"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_agent_publishes_facts_and_inventory_on_its_own_node_only(world: World, kube: FakeKube) -> None:
    plan = cached(world, "a", name="demo")
    out = agent(world, kube)
    assert out.returncode == 0, out.stderr
    a = node_annotations(kube)
    assert a["team"] == "ml"  # a merge patch: the node's other annotations are untouched
    assert a[NODE_FACTS] == canonical_json(FACTS).decode()
    inv = parse_inventory(a[NODE_CACHE])
    # just fetched, so its pages are in node memory: the "memory" tier (when the cache is on disk)
    in_memory_fs = _fs_type(world.cache) in MEMORY_FS
    assert [(s["name"], s["id"], s["compat"], s["tier"]) for s in inv["snapshots"]] == [
        ("demo", plan["snapshot"], compat_key(FACTS), "memory")
    ]
    assert inv["snapshots"][0]["bytes"] == 100_001
    assert 0 < inv["free_bytes"] <= GIB - 100_001
    assert "restoring" not in inv
    assert node_annotations(kube, "gpu-2") == {"team": "web"}
    assert [r for r in kube.requests if r.startswith("PATCH")] == ["PATCH /api/v1/nodes/gpu-1"]
    # The agent records its budget for thaw fetch.
    assert orjson.loads((world.cache / ".config.json").read_bytes()) == {"budget": GIB}
    # Out of the page cache (memory pressure), it is on disk again.
    if not in_memory_fs:
        for f in Path(plan["path"]).iterdir():
            fd = os.open(f, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        assert agent(world, kube).returncode == 0
        tiers = [s["tier"] for s in parse_inventory(node_annotations(kube)[NODE_CACHE])["snapshots"]]
        assert tiers == ["disk"]


def test_driver_upgrade_removes_snapshots_the_node_can_no_longer_restore(
    world: World, kube: FakeKube
) -> None:
    plan = cached(world, "a")
    upgraded = facts(driver="590.10.01")
    out = agent(world, kube, f=upgraded)
    assert out.returncode == 0, out.stderr
    assert "no longer compatible" in out.stderr
    assert not Path(plan["path"]).exists()
    a = node_annotations(kube)
    assert orjson.loads(a[NODE_FACTS])["driver"] == "590.10.01"
    assert parse_inventory(a[NODE_CACHE])["snapshots"] == []


def test_budget_evicts_least_recently_used_first_never_in_use(world: World, kube: FakeKube) -> None:
    plans = {t: cached(world, t) for t in ("a", "b", "c", "d")}
    now = time.time()
    for age, t in enumerate(("d", "b", "c", "a")):  # last use: a oldest, then c, b, d newest
        lock = Path(plans[t]["path"] + ".use")
        os.utime(lock, (now - 1000 * (age + 1), now - 1000 * (age + 1)))
    holder = hold(plans["a"])  # the oldest is being restored right now
    try:
        out = agent(world, kube, budget=250_000)  # room for two 100 kB snapshots
        assert out.returncode == 0, out.stderr
        present = {t for t, p in plans.items() if Path(p["path"]).exists()}
        assert present == {"a", "d"}  # c and b went (LRU), a is in use, d fits
        inv = parse_inventory(node_annotations(kube)[NODE_CACHE])
        assert inv.get("restoring") == 1
        assert {s["name"] for s in inv["snapshots"]} == {"snap-a", "snap-d"}
    finally:
        holder.communicate("")
    out = agent(world, kube, budget=150_000)
    assert out.returncode == 0, out.stderr
    # The agent marked a used while the restore held it, so it is now the most recent: d goes.
    assert Path(plans["a"]["path"]).exists() and not Path(plans["d"]["path"]).exists()
    assert "restoring" not in parse_inventory(node_annotations(kube)[NODE_CACHE])


def test_missing_node_is_an_error_the_loop_survives(world: World, kube: FakeKube) -> None:
    env = {"KUBECONFIG": str(kubeconfig(world.root / "kubeconfig", kube.url))}
    out = thaw_cli(
        "agent", "--cache", world.cache, "--budget", "1000", "--facts", world.facts_file(),
        "--node", "ghost", "--once", env=env,
    )  # fmt: skip
    assert out.returncode == 1 and "agent pass failed" in out.stderr and "404" in out.stderr
    bad = thaw_cli("agent", "--cache", world.cache, "--budget", "-1", "--once")
    assert bad.returncode == 2 and "--budget" in bad.stderr


def test_agent_loop_patches_changes_and_stops_on_sigterm(world: World, kube: FakeKube) -> None:
    env = thaw_env({"KUBECONFIG": str(kubeconfig(world.root / "kubeconfig", kube.url))})
    proc = subprocess.Popen(
        [*thaw_command(), "agent", "--cache", str(world.cache), "--budget", str(GIB),
         "--facts", str(world.facts_file()), "--node", "gpu-1", "--interval", "0.1"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while NODE_CACHE not in node_annotations(kube):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert parse_inventory(node_annotations(kube)[NODE_CACHE])["snapshots"] == []
        patches = sum(r.startswith("PATCH") for r in kube.requests)
        plan = cached(world, "late", name="late")
        while not parse_inventory(node_annotations(kube)[NODE_CACHE])["snapshots"]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert parse_inventory(node_annotations(kube)[NODE_CACHE])["snapshots"][0]["id"] == plan["snapshot"]
        assert sum(r.startswith("PATCH") for r in kube.requests) > patches
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_without_a_node_it_prints_the_annotations(world: World) -> None:
    cached(world, "a", name="demo")
    out = thaw_cli(
        "agent", "--cache", world.cache, "--budget", str(GIB), "--facts", world.facts_file(), "--once"
    )
    assert out.returncode == 0, out.stderr
    a = orjson.loads(out.stdout)
    assert set(a) == {NODE_FACTS, NODE_CACHE}
    assert len(a[NODE_CACHE].encode()) < 64 * 1024


def test_heartbeat_and_healthcheck(world: World, kube: FakeKube) -> None:
    beat = world.root / "alive"
    assert agent(world, kube, "--heartbeat", str(beat)).returncode == 0
    assert time.time() - beat.stat().st_mtime < 60
    ok = thaw_cli("healthcheck", "--file", beat, "--max-age", "300")
    assert ok.returncode == 0 and ok.stderr == ""
    os.utime(beat, (time.time() - 1000,) * 2)
    stale = thaw_cli("healthcheck", "--file", beat, "--max-age", "300")
    assert (
        stale.returncode == 1 and "is 1000 s old (more than 300 s): the agent's loop is stuck" in stale.stderr
    )
    missing = thaw_cli("healthcheck", "--file", world.root / "none", "--max-age", "300")
    assert missing.returncode == 1 and "no heartbeat at" in missing.stderr


def test_agent_publishes_the_nodes_fetch_throughput(world: World, kube: FakeKube) -> None:
    """Issue 13: thaw.dev/cache carries the median throughput of the node's recent misses, from the
    restore plans in its pods' outcome copies; hits and small copies say nothing about the store."""
    from thaw.snapshot.outcome_copy import write_outcome_copy

    cached(world, "a", name="demo")
    gb = 10**9
    for i, (copied, seconds) in enumerate(
        [(4 * gb, 8.0), (2 * gb, 1.0), (6 * gb, 10.0), (0, 0.1), (10**6, 0.001)]
    ):
        fetch = {"bytes": copied, "seconds": seconds}
        plan = {"action": "restore", "path": "/x", "snapshot": "sha256:" + "a" * 64, "fetch": fetch}
        outcome = {"result": "restored", "started": f"2026-12-01T00:00:0{i}Z", "plan": plan}
        write_outcome_copy(world.cache, f"0000000{i}-0000-4000-8000-000000000000", orjson.dumps(outcome))
    assert agent(world, kube).returncode == 0
    inv = parse_inventory(node_annotations(kube)[NODE_CACHE])
    assert inv["fetch"] == {"bps": 600_000_000, "n": 3}  # median of 0.5, 2.0 and 0.6 GB/s
    assert [s["name"] for s in inv["snapshots"]] == ["demo"]
