"""The node cache as a library: staging, the restore's verified hold, pins, eviction, upkeep, and an
inventory that advertises only what verifies (issue 11.1, 11.4, 11.6)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.needs import require, root
from tests.runtime.snapshots import FACTS, World, facts, flock_held
from thaw.contract.facts import compat_key
from thaw.contract.manifest import Manifest, build_manifest, hex_of, sign_manifest
from thaw.contract.signing import TrustedKeys, key_id, public_key_pem
from thaw.snapshot.cache import (
    PIN_TTL_S,
    CacheBusy,
    SnapshotGone,
    StderrProgress,
    VerifyFailed,
    add_local,
    clean_stale,
    evict,
    hold_verified,
    inventory,
    list_cached,
    make_room,
    pin,
    read_budget,
    remove_incompatible,
    room_problem,
    snapshot_path,
    stage,
    write_budget,
)
from thaw.snapshot.store import DigestMismatch, DirectoryStore, publish
from thaw.snapshot.transfer import hash_files

KEY = Ed25519PrivateKey.generate()
UID = "5d3c1a2b-9f8e-4d7c-8b6a-0f1e2d3c4b5a"


def images(tmp_path: Path, tag: str, size: int = 50_000) -> Path:
    d = tmp_path / "img" / tag
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(size))
    (d / "core-1.img").write_bytes(tag.encode())
    return d


def local_manifest(img: Path, name: str = "demo", f: object = FACTS, chunk_bytes: int = 1 << 20) -> Manifest:
    files = hash_files(img, chunk_bytes=chunk_bytes)
    return sign_manifest(build_manifest(name, "w1", f, files, chunk_bytes=chunk_bytes), KEY)  # type: ignore[arg-type]


def cached(tmp_path: Path, tag: str = "a", size: int = 50_000, **kw: object) -> tuple[Path, Manifest]:
    img = images(tmp_path, tag, size)
    m = local_manifest(img, **kw)  # type: ignore[arg-type]
    return add_local(tmp_path / "cache", m, img, signer=KEY.public_key()), m


def soon(seconds: float = 2.0) -> float:
    return time.monotonic() + seconds


def test_add_local_layout_per_namespace_root_only(tmp_path: Path) -> None:
    img = images(tmp_path, "a")
    m = local_manifest(img)
    cache = tmp_path / "cache"
    path = add_local(cache, m, img, namespace="team-a", signer=KEY.public_key())
    assert path == snapshot_path(cache, "team-a", m) == cache.absolute() / "team-a" / "demo" / hex_of(m["id"])
    assert (path / "pages-1.img").read_bytes() == (img / "pages-1.img").read_bytes()
    assert stat.S_IMODE((path / "pages-1.img").stat().st_mode) == 0o600
    for d in (cache / "team-a", cache / "team-a" / "demo", path):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (path / ".signer.pub").read_bytes() == public_key_pem(KEY.public_key())
    assert [(e.namespace, e.manifest["id"]) for e in list_cached(cache)] == [("team-a", m["id"])]
    assert add_local(cache, m, img, namespace="team-a") == path  # idempotent


# --- the restore's hold: verified right before CRIU ----------------------------------------------


def test_hold_verified_yields_the_plans_manifest_after_rehashing(tmp_path: Path) -> None:
    path, m = cached(tmp_path, size=3 * (1 << 20) + 5)  # 4 chunks of 1 MiB
    with hold_verified(path, m["id"], soon(), workers=4) as got:
        assert got == m
        assert evict(path) is False  # held: never evicted under a restore
        assert inventory(tmp_path / "cache", FACTS).get("restoring") == 1
    assert evict(path) is True


def test_a_cotenant_rewriting_a_cached_file_after_fetch_is_caught_before_criu(tmp_path: Path) -> None:
    """Issue 11.1: a co-tenant overwrote pages-1.img after the snapshot was verified and staged; the
    next restore found the directory complete and would have run the co-tenant's bytes. The
    restore's own check names the file and the chunk."""
    path, m = cached(tmp_path, size=3 * (1 << 20))
    f = path / "pages-1.img"
    data = bytearray(f.read_bytes())
    data[(1 << 20) + 10] ^= 0xFF  # same size, one byte of the second chunk
    f.write_bytes(bytes(data))
    with (
        pytest.raises(VerifyFailed, match=r"pages-1\.img chunk 1 .* has sha256"),
        hold_verified(path, m["id"], soon()),
    ):
        pytest.fail("a tampered snapshot was handed to the restore")
    f.write_bytes(bytes(data[:-1]))  # shorter
    with (
        pytest.raises(VerifyFailed, match=r"pages-1\.img has 3145727 bytes"),
        hold_verified(path, m["id"], soon()),
    ):
        pass
    f.unlink()
    f.symlink_to(tmp_path / "img" / "a" / "pages-1.img")  # the right bytes, through a link
    with pytest.raises(VerifyFailed, match="symlink"), hold_verified(path, m["id"], soon()):
        pass


def test_hold_verified_refuses_another_snapshot_extra_files_and_a_missing_lock(tmp_path: Path) -> None:
    path, m = cached(tmp_path)
    other = "sha256:" + "0" * 64
    with pytest.raises(VerifyFailed, match="not sha256:0000"), hold_verified(path, other, soon()):
        pass
    (path / "pages-2.img").write_bytes(b"planted")
    planted = pytest.raises(VerifyFailed, match=r"pages-2\.img, which its manifest does not list")
    with planted, hold_verified(path, m["id"], soon()):
        pass
    (path / "pages-2.img").unlink()
    assert evict(path)
    with (
        pytest.raises(SnapshotGone, match="no longer in the node cache"),
        hold_verified(path, m["id"], soon()),
    ):
        pass


def test_hold_verified_never_hangs_on_a_lock_held_forever(tmp_path: Path) -> None:
    path, m = cached(tmp_path)
    t = time.monotonic()
    with flock_held(path.parent / (path.name + ".use")):
        busy = pytest.raises(CacheBusy, match="held the lock past the deadline")
        with busy, hold_verified(path, m["id"], soon(0.5)):
            pass
    assert time.monotonic() - t < 5


@pytest.fixture
def ro_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The workload's view: ``<cache>/<namespace>/<name>`` bind-mounted read-only elsewhere."""
    path, _ = cached(tmp_path)
    view = tmp_path / "view"
    view.mkdir()
    require(root("bind-mounts"))
    subprocess.run(["mount", "--bind", str(path.parent), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view / path.name, path
    finally:
        subprocess.run(["umount", str(view)], check=False)


def test_hold_verified_works_through_a_read_only_mount(ro_view: tuple[Path, Path]) -> None:
    view, real = ro_view
    m = list_cached(real.parents[2])[0].manifest
    with hold_verified(view, m["id"], soon()) as got:
        assert got["id"] == m["id"]
        assert evict(real) is False  # the shared lock taken through the read-only view holds
    with pytest.raises(OSError):
        (view / "pages-1.img").write_bytes(b"x")


# --- pins, eviction, room --------------------------------------------------------------------------


def test_a_fresh_pin_keeps_a_snapshot_until_it_expires(tmp_path: Path) -> None:
    path, m = cached(tmp_path)
    pin(path, UID)
    pin_file = path.parent / f"{path.name}.pin-{UID}"
    assert pin_file.is_file()
    assert evict(path) is False
    with pytest.raises(Exception, match="cache full"):
        make_room(tmp_path / "cache", 10, budget=m["total_bytes"])  # only the pinned one could go
    old = time.time() - PIN_TTL_S - 1
    os.utime(pin_file, (old, old))
    assert clean_stale(tmp_path / "cache") == [str(pin_file)]  # the agent removes expired pins
    assert evict(path) is True


def test_stage_refuses_a_store_file_that_differs_and_leaves_no_temp(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    m = publish(store, "demo", "w1", images(tmp_path, "a"), None, FACTS)
    f = store.snapshot_dir("default", "demo", m["id"]) / "pages-1.img"
    data = bytearray(f.read_bytes())
    data[5] ^= 1
    f.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(DigestMismatch, match=r"pages-1\.img chunk 0 .* has sha256"):
        stage(store, m, cache)
    assert sorted(p.name for p in (cache / "default" / "demo").iterdir()) == [hex_of(m["id"]) + ".fetch"]


def test_room_problem_counts_what_could_be_evicted(tmp_path: Path) -> None:
    path, m = cached(tmp_path)
    cache = tmp_path / "cache"
    size = m["total_bytes"]
    assert room_problem(cache, size, budget=size + 10) is None  # evicting it would make room
    pin(path, UID)
    assert "cannot take" in (room_problem(cache, size, budget=size + 10) or "")
    assert "could be free on the filesystem" in (room_problem(cache, 10**18) or "")


# --- upkeep ----------------------------------------------------------------------------------------


def test_clean_stale_removes_only_what_dead_processes_left(tmp_path: Path) -> None:
    """Issue 11.6: a writer killed mid-copy left its temporary copy for a day. A temporary whose
    writer is gone (its flock is free) goes at the next pass; a live writer's stays."""
    path, _ = cached(tmp_path)
    cache = tmp_path / "cache"
    nd = path.parent
    dead, live = nd / ".tmp-dead", nd / ".tmp-live"
    dead.mkdir()
    (dead / "pages-1.img").write_bytes(b"half")
    live.mkdir()
    with flock_held(live):  # its writer is alive
        (nd / ".trash-half").mkdir()
        (nd / ("d" * 64 + ".use")).touch()  # lock of a snapshot long gone
        (nd / ("e" * 64)).mkdir()  # no manifest: never a whole snapshot
        (nd / ("f" * 64)).symlink_to(path)  # not something staging makes
        old_layout = cache / "demo" / ("1" * 64)  # <cache>/<name>/<hex>: before namespaces
        old_layout.mkdir(parents=True)
        old_dump, new_dump = cache / ".thaw-dump-old", cache / ".thaw-dump-new"
        old_dump.mkdir()
        new_dump.mkdir()
        os.utime(old_dump, (time.time() - 3 * 3600,) * 2)
        removed = clean_stale(cache)
        assert sorted(Path(r).name for r in removed) == sorted(
            [".tmp-dead", ".trash-half", "d" * 64 + ".use", "e" * 64, "f" * 64, "1" * 64, ".thaw-dump-old"]
        )
        assert live.exists() and new_dump.exists() and not old_layout.exists()
        assert sorted(p.name for p in nd.iterdir()) == sorted(
            [path.name, path.name + ".use", path.name + ".fetch", ".tmp-live"]
        )
    assert str(live) in clean_stale(cache)  # its writer is gone now


def test_remove_incompatible_and_inventory_lists_only_restorable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old, old_m = cached(tmp_path, "a")
    new_facts = facts(criu="5.0")  # a CRIU major release: another key (a minor one keeps it)
    new, _ = cached(tmp_path, "b", name="other", f=new_facts)
    inv = inventory(cache, new_facts, budget=10**9)
    assert [s["compat"] for s in inv["snapshots"]] == [compat_key(new_facts)]
    assert inv["free_bytes"] <= 10**9 - 2 * 50_001
    assert remove_incompatible(cache, new_facts) == [f"default/demo/{old_m['id']}"]
    assert not old.exists() and new.exists()


def test_inventory_advertises_only_snapshots_whose_signature_verifies(tmp_path: Path) -> None:
    """Issue 11.1: a manifest copied beside a co-tenant's own files was advertised, even unsigned,
    and the extender sent another tenant's pods there."""
    cache = tmp_path / "cache"
    good, m = cached(tmp_path, "a")
    img = images(tmp_path, "b")
    unsigned = build_manifest("demo", "w1", FACTS, hash_files(img))
    add_local(cache, unsigned, img)  # staged, but nothing vouches for it
    forged_key = Ed25519PrivateKey.generate()
    img_c = images(tmp_path, "c")
    forged = sign_manifest(build_manifest("demo", "w1", FACTS, hash_files(img_c)), forged_key)
    forged_path = add_local(cache, forged, img_c, signer=forged_key.public_key())
    assert {s["id"] for s in inventory(cache, FACTS)["snapshots"]} == {m["id"], forged["id"]}
    # A signer file that does not match the signature (swapped, or the manifest re-signed): not listed.
    (forged_path / ".signer.pub").write_bytes(public_key_pem(KEY.public_key()))
    assert [s["id"] for s in inventory(cache, FACTS)["snapshots"]] == [m["id"]]
    # With the trust directory's keys: only those.
    trusted = TrustedKeys("test", {key_id(forged_key.public_key()): forged_key.public_key()})
    (forged_path / ".signer.pub").write_bytes(public_key_pem(forged_key.public_key()))
    assert [s["id"] for s in inventory(cache, FACTS, trusted=trusted)["snapshots"]] == [forged["id"]]
    # A FIFO as the signer file, or as manifest.json: skipped at once, never read.
    (good / ".signer.pub").unlink()
    os.mkfifo(good / ".signer.pub")
    os.unlink(forged_path / "manifest.json")
    os.mkfifo(forged_path / "manifest.json")
    assert inventory(cache, FACTS)["snapshots"] == []


def test_budget_file_and_progress_lines(tmp_path: Path) -> None:
    assert read_budget(tmp_path) is None
    write_budget(tmp_path, 1234)
    assert read_budget(tmp_path) == 1234
    (tmp_path / ".config.json").write_text("{bad")
    assert read_budget(tmp_path) is None
    (tmp_path / ".config.json").unlink()
    os.mkfifo(tmp_path / ".config.json")
    assert read_budget(tmp_path) is None  # a FIFO: never blocks
    out = io.StringIO()
    p = StderrProgress("fetch demo", 100, out)
    for _ in range(10):
        p(10)
    p.finish()
    lines = out.getvalue().splitlines()
    assert lines[-2].endswith("(100%)") and "sha256 verified" in lines[-1]
    assert len(lines) <= 12


def test_world_helpers_agree_with_the_library(tmp_path: Path) -> None:
    """The CLI's fetch stages exactly what stage() would: same path, same manifest."""
    w = World(tmp_path)
    w.setup_keys()
    sid = w.publish(images(tmp_path, "x"))
    plan = w.fetch()
    entry = list_cached(w.cache)[0]
    assert entry.manifest["id"] == sid and str(entry.path) == plan["path"]
