"""``thaw gc``: retention for both stores, the nodes' advertised snapshots read from a cluster
(tests/fakekube.py speaks the real wire format to the official client)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fakekube import FakeKube, running
from tests.registry.server import Registry
from tests.runtime.snapshots import FACTS, World, kubeconfig, node
from thaw.contract.annotations import NODE_CACHE
from thaw.contract.manifest import build_manifest
from thaw.dev.sandbox import thaw_cli
from thaw.node.gc import Entry, GcError, advertised_ids, retention
from thaw.snapshot.stores import RegistryOptions, open_store


def _entry(name: str, workload: str, created: str, stored_at: float | None = None) -> Entry:
    files = [{"path": "a.img", "size": 1, "sha256": os.urandom(32).hex()}]
    return Entry("ns", name, build_manifest(name, workload, FACTS, files, created), stored_at)  # type: ignore[arg-type]


def test_retention_keeps_the_newest_per_workload_and_what_nodes_hold() -> None:
    w1 = [_entry("demo", "w1", f"2026-11-2{i}T00:00:00Z") for i in range(1, 6)]  # newest last
    w2 = [_entry("demo", "w2", "2026-11-01T00:00:00Z")]
    decisions = {d.entry.id: d for d in retention([*w1, *w2], 2, {w1[0].id: ["gpu-a"]})}
    assert [decisions[e.id].action for e in w1] == ["keep", "delete", "delete", "keep", "keep"]
    assert decisions[w1[0].id].why == "advertised by node(s) gpu-a"
    assert decisions[w2[0].id].action == "keep"  # another workload: its own newest
    # The store's time wins when it is earlier: a manifest "created" in the future is not the newest.
    liar = _entry("demo", "w1", "2030-01-01T00:00:00Z", stored_at=1.0)
    assert {d.entry.id: d.action for d in retention([*w1, liar], 2, {})}[liar.id] == "delete"
    with pytest.raises(ValueError, match="--keep must be at least 1"):
        retention(w1, 0, {})


def test_an_unreadable_node_annotation_deletes_nothing() -> None:
    assert (
        advertised_ids([("gpu-a", None), ("gpu-b", {NODE_CACHE: '{"v":1,"free_bytes":0,"snapshots":[]}'})])
        == {}
    )
    with pytest.raises(GcError, match=r"node gpu-b: invalid thaw\.dev/cache .* nothing deleted"):
        advertised_ids([("gpu-b", {NODE_CACHE: '{"v": 2}'})])


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with running() as k:
        yield k


def _advertise(kube: FakeKube, snapshot_id: str) -> None:
    snap = {
        "name": "demo", "id": snapshot_id, "workload": "w1", "compat": "x", "bytes": 1, "tier": "disk",
        "last_used": "2026-11-28T05:40:00Z",
    }  # fmt: skip
    inv = {"v": 1, "free_bytes": 1, "snapshots": [snap]}
    kube.add(node("gpu-a", {NODE_CACHE: orjson.dumps(inv).decode()}))
    kube.add(node("gpu-b"))


@pytest.mark.parametrize("kind", ["directory", "registry"])
def test_thaw_gc(kind: str, kube: FakeKube, registry: Registry, tmp_path: Path) -> None:
    w = World(tmp_path)
    w.setup_keys()
    if kind == "registry":
        store = registry.store(repository=f"gc/{tmp_path.name.replace('_', '-').lower()}")
        flags = [
            "--store",
            store,
            "--registry-auth",
            str(registry.auth_file()),
            "--registry-ca",
            str(registry.ca),
        ]
        opened = open_store(store, RegistryOptions(registry.auth_file(), registry.ca))
    else:
        store = str(tmp_path / "store")
        flags = ["--store", store]
        opened = open_store(store)

    def publish(workload: str, content: bytes) -> str:
        images = w.images(f"{workload}-{content.hex()}", {"a.img": content})
        out = thaw_cli(
            "publish", *flags, "--name", "demo", "--workload", workload, "--images", images,
            "--key", w.keys / "signing.key", "--facts", w.facts_file(),
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    w1 = [publish("w1", bytes([i])) for i in range(4)]  # oldest first
    w2 = publish("w2", b"other")
    _advertise(kube, w1[0])
    env = {"KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", kube.url))}

    def ids() -> set[str]:
        return {x.manifest["id"] for x in opened.list_snapshots("default", "demo")}

    dry = thaw_cli("gc", *flags, "--keep", "2", "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert [ln.split()[0] for ln in dry.stdout.splitlines() if w1[1][:19] in ln] == ["would"]
    assert "advertised by node(s) gpu-a" in dry.stdout
    assert ids() == {*w1, w2}  # a dry run deletes nothing

    down = thaw_cli(
        "gc",
        *flags,
        "--keep",
        "2",
        env={"KUBECONFIG": str(kubeconfig(tmp_path / "k2", "http://127.0.0.1:9"))},
    )
    assert down.returncode == 1 and "cannot list Nodes" in down.stderr and "nothing deleted" in down.stderr
    assert ids() == {*w1, w2}

    real = thaw_cli("gc", *flags, "--keep", "2", env=env)
    assert real.returncode == 0, real.stderr
    assert "deleted 1, kept 4" in real.stderr
    assert ids() == {w1[0], w1[2], w1[3], w2}  # the newest two, the advertised one, the other workload
