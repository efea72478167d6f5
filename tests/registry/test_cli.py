"""The CLI against a real registry: ``thaw publish`` pushes a snapshot, ``thaw fetch`` pulls it into an
empty cache; a registry refusing the credentials, stopped, serving a tampered blob, or cut halfway
gives a cold plan whose reason says so, and leaves nothing in the cache but what a completed fetch
leaves (no temp directory, no half snapshot)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.registry.server import CuttingProxy, Registry
from tests.runtime.snapshots import World, cache_entries
from thaw.contract.manifest import parse_manifest
from thaw.dev.sandbox import read_json, thaw_cli
from thaw.snapshot.registry import parts_of

IMAGES = {"pages-1.img": os.urandom(150 * 1024 * 1024 + 4321), "core-1.img": b"core" * 4096}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = World(tmp_path_factory.mktemp("world"))
    w.setup_keys()
    return w


def publish(w: World, reg: Registry, name: str = "demo") -> str:
    images = w.images(name, IMAGES)
    out = thaw_cli(
        "publish", "--store", reg.store(), "--registry-auth", reg.auth_file(), "--registry-ca", reg.ca,
        "--name", name, "--workload", "w1", "--images", images, "--key", w.keys / "signing.key",
        "--facts", w.facts_file(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def fetch(w: World, store: str, cache: Path, auth: Path, ca: Path) -> dict[str, Any]:
    plan_path = cache.parent / f"plan-{cache.name}.json"
    out = thaw_cli(
        "fetch", "--store", store, "--registry-auth", auth, "--registry-ca", ca, "--cache", cache,
        "--name", "demo", "--workload", "w1", "--trust", w.trust, "--plan", plan_path,
        "--facts", w.facts_file(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr  # never fails the pod
    plan: dict[str, Any] = read_json(plan_path)
    plan["_stderr"] = out.stderr
    return plan


def no_partial(cache: Path) -> None:
    left = [
        e for e in cache_entries(cache) if "/.tmp-" in f"/{e}" or e.rsplit("/", 1)[-1].startswith(".tmp-")
    ]
    assert left == [], left
    snapshots = [e for e in cache_entries(cache) if len(e.split("/")) == 3 and "." not in e.split("/")[2]]
    assert snapshots == [], snapshots


def test_publish_then_fetch_into_an_empty_cache(world: World, registry: Registry, tmp_path: Path) -> None:
    sid = publish(world, registry)
    plan = fetch(world, registry.store(), tmp_path / "cache", registry.auth_file(), registry.ca)
    assert plan["action"] == "restore", plan
    assert plan["snapshot"] == sid
    snap = Path(plan["path"])
    assert (snap / "pages-1.img").read_bytes() == IMAGES["pages-1.img"]
    assert parse_manifest((snap / "manifest.json").read_bytes())["id"] == sid
    assert "sha256 verified" in plan["_stderr"] and "/s)" in plan["_stderr"]  # throughput in the log


def _cold(plan: dict[str, Any], *words: str) -> str:
    assert plan["action"] == "cold", plan
    reason = str(plan["reason"])
    for w in words:
        assert w in reason, reason
    return reason


def test_wrong_credentials_give_a_cold_plan(world: World, registry: Registry, tmp_path: Path) -> None:
    publish(world, registry)
    bad = registry.auth_file("bad.json", password="nope")
    plan = fetch(world, registry.store(), tmp_path / "cache", bad, registry.ca)
    _cold(plan, "store unreadable", "refused the credentials (401)")
    no_partial(tmp_path / "cache")


def test_untrusted_tls_gives_a_cold_plan(world: World, registry: Registry, tmp_path: Path) -> None:
    other_ca = tmp_path / "other"
    assert thaw_cli("certs", "--out", other_ca, "--dns", "localhost").returncode == 0
    plan = fetch(world, registry.store(), tmp_path / "cache", registry.auth_file(), other_ca / "ca.crt")
    _cold(plan, "TLS verification failed")


def test_stopped_registry_gives_a_cold_plan(world: World, fresh_registry: Registry, tmp_path: Path) -> None:
    publish(world, fresh_registry)
    fresh_registry.stop()
    plan = fetch(
        world, fresh_registry.store(), tmp_path / "cache", fresh_registry.auth_file(), fresh_registry.ca
    )
    _cold(plan, "store unreadable", "unreachable", "refused")
    no_partial(tmp_path / "cache")


def test_tampered_blob_gives_a_cold_plan(world: World, fresh_registry: Registry, tmp_path: Path) -> None:
    sid = publish(world, fresh_registry)
    cached = fetch(
        world, fresh_registry.store(), tmp_path / "probe", fresh_registry.auth_file(), fresh_registry.ca
    )
    manifest = parse_manifest((Path(cached["path"]) / "manifest.json").read_bytes())
    assert manifest["id"] == sid
    blob = fresh_registry.blob_path(parts_of(manifest)[-1].digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x40
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    plan = fetch(
        world, fresh_registry.store(), tmp_path / "cache", fresh_registry.auth_file(), fresh_registry.ca
    )
    _cold(plan, "digest mismatch", "tampered or corrupt")
    no_partial(tmp_path / "cache")


@pytest.mark.parametrize("refuse", [False, True], ids=["resumed", "gone"])
def test_connection_cut_halfway(world: World, registry: Registry, tmp_path: Path, refuse: bool) -> None:
    publish(world, registry)
    proxy = CuttingProxy(registry.port, cut_after=70 * 1024 * 1024, refuse_after_cut=refuse)
    try:
        auth = registry.auth_file("proxy.json", hosts=[proxy.host])
        plan = fetch(world, registry.store(host=proxy.host), tmp_path / "cache", auth, registry.ca)
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert "resuming at byte" in plan["_stderr"]
    if refuse:
        _cold(plan, "store unreadable", "gave up on blob")
        no_partial(tmp_path / "cache")
    else:
        assert plan["action"] == "restore", plan
        assert (Path(plan["path"]) / "pages-1.img").read_bytes() == IMAGES["pages-1.img"]


def test_bad_store_spec_is_a_cold_plan_not_a_failed_pod(world: World, tmp_path: Path) -> None:
    plan = fetch(
        world, "oci://registry.example:5000/Bad_Repo", tmp_path / "cache", tmp_path / "none", tmp_path / "x"
    )
    _cold(plan, "store unusable", "repository component 'Bad_Repo'")
