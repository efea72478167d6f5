"""``thaw publish`` and the directory store: layout, permissions, atomicity against real readers."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.runtime.snapshots import FACTS, THAW, World, read_json, thaw
from thaw.contract.manifest import check_files, hex_of, verify_manifest
from thaw.contract.signing import load_trusted_keys
from thaw.snapshot.store import DirectoryStore, StoreError

BIG_FILES = 6
BIG_FILE_BYTES = 48 * 1024 * 1024


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    w.setup_keys()
    return w


def test_publish_layout_permissions_and_listing(world: World) -> None:
    images = world.images("a", {"pages-1.img": os.urandom(50_000), "core-1.img": b"core", "d/x.img": b"x"})
    sid = world.publish(images)
    d = world.store / "demo" / hex_of(sid)
    assert sorted(p.name for p in d.rglob("*")) == [
        "core-1.img",
        "d",
        "manifest.json",
        "pages-1.img",
        "x.img",
    ]
    for p in [world.store / "demo", d, d / "d"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in [d / "manifest.json", d / "pages-1.img", d / "d" / "x.img"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    m = read_json(d / "manifest.json")
    assert m["id"] == sid and m["facts"] == FACTS and m["workload"] == "w1"
    check_files(d, m)
    verify_manifest(m, load_trusted_keys(world.trust))
    sid2 = world.publish(images, workload="w2")
    listed = DirectoryStore(world.store).list_snapshots("demo")
    assert [x["id"] for x in listed] == [sid2, sid]  # newest first
    assert DirectoryStore(world.store).list_snapshots("other") == []


def test_publish_refuses_bad_input_with_one_line(world: World, tmp_path: Path) -> None:
    images = world.images("a", {"core-1.img": b"core"})
    (images / "link.img").symlink_to("core-1.img")
    out = thaw(
        "publish", "--store", world.store, "--name", "demo", "--workload", "w", "--images", images,
        "--key", world.keys / "signing.key", "--facts", world.facts_file(),
    )  # fmt: skip
    assert out.returncode == 1 and "symlink" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = thaw(
        "publish", "--store", world.store, "--name", "Bad_Name", "--workload", "w", "--images", images,
        "--key", tmp_path / "nokey", "--facts", world.facts_file(),
    )  # fmt: skip
    assert out.returncode == 1 and "cannot read signing key" in out.stderr
    assert not (world.store / "demo").exists() and not (world.store / "Bad_Name").exists()


def test_listing_skips_malformed_and_misplaced_entries_and_says_why(world: World) -> None:
    sid = world.publish(world.images("a", {"core-1.img": b"core"}))
    good = world.store / "demo" / hex_of(sid)
    junk = world.store / "demo" / ("f" * 64)
    junk.mkdir()
    (junk / "manifest.json").write_bytes((good / "manifest.json").read_bytes())  # right manifest, wrong place
    (world.store / "demo" / "notes").mkdir()
    problems: list[str] = []
    assert [m["id"] for m in DirectoryStore(world.store).list_snapshots("demo", problems)] == [sid]
    assert any("not what its path says" in p for p in problems)
    assert any("notes" in p for p in problems)
    with pytest.raises(StoreError, match="does not exist"):
        DirectoryStore(world.root / "unmounted").list_snapshots("demo")


def _wait_for_partial_publish(store: Path, proc: subprocess.Popen[bytes]) -> Path | None:
    """The publish's temporary directory once it holds a file, or None if the publish ended first."""
    while proc.poll() is None:
        for tmp in (store / "demo").glob(".tmp-*"):
            if any(tmp.iterdir()):
                return tmp
        time.sleep(0.001)
    return None


def test_publish_is_atomic_for_readers_stopped_and_killed_midway(world: World) -> None:
    """Freeze a real publish midway (SIGSTOP) and read the store: the snapshot is not there, only a
    temporary directory readers skip. Let it finish: all of it is there. Kill another midway: the
    store still lists only whole snapshots."""
    images = world.images("big", {f"pages-{i}.img": os.urandom(BIG_FILE_BYTES) for i in range(BIG_FILES)})
    store = DirectoryStore(world.store)
    args = [
        THAW, "publish", "--store", str(world.store), "--name", "demo", "--workload", "w1", "--images",
        str(images), "--key", str(world.keys / "signing.key"), "--facts", str(world.facts_file()),
    ]  # fmt: skip
    for _ in range(5):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tmp = _wait_for_partial_publish(world.store, proc)
        if tmp is None:  # finished before we saw it half-way: try again with a fresh publish
            proc.communicate()
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            seen = store.list_snapshots("demo")
            assert all(m["id"] for m in seen)
            for m in seen:  # only earlier, complete publishes
                check_files(store.snapshot_dir("demo", m["id"]), m)
            before = {m["id"] for m in seen}
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        sid = out.decode().strip()
        assert sid not in before
        after = store.list_snapshots("demo")
        assert sid in {m["id"] for m in after}
        m = next(m for m in after if m["id"] == sid)
        check_files(store.snapshot_dir("demo", sid), m)
        assert not tmp.exists()
        break
    else:
        pytest.fail("publish always finished before a partial state could be observed")

    listed_before = {m["id"] for m in store.list_snapshots("demo")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tmp = _wait_for_partial_publish(world.store, proc)
    proc.kill()
    proc.communicate()
    after_kill = store.list_snapshots("demo")
    if tmp is not None:
        assert {m["id"] for m in after_kill} == listed_before
        assert tmp.exists()  # left for the stale-publish cleanup, invisible to readers
    for m in after_kill:
        check_files(store.snapshot_dir("demo", m["id"]), m)
