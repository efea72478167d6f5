"""``thaw publish`` and the directory store: layout per namespace, permissions, atomicity against
real readers, and listings that nothing in the store can hang or bloat (issue 11.4)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.runtime.snapshots import FACTS, World
from thaw.contract.manifest import (
    MAX_MANIFEST_BYTES,
    build_manifest,
    dump_manifest,
    hex_of,
    load_manifest,
    verify_manifest,
)
from thaw.contract.signing import load_trusted_keys
from thaw.dev.sandbox import thaw_cli, thaw_command, thaw_env
from thaw.snapshot.store import MAX_LISTED, DirectoryStore, StoreError
from thaw.snapshot.transfer import hash_files, verify_files

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
    d = world.store / "default" / "demo" / hex_of(sid)
    assert sorted(p.name for p in d.rglob("*")) == [
        "core-1.img",
        "d",
        "manifest.json",
        "pages-1.img",
        "x.img",
    ]
    for p in [world.store / "default" / "demo", d, d / "d"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in [d / "manifest.json", d / "pages-1.img", d / "d" / "x.img"]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    m = load_manifest(d / "manifest.json")
    assert m["id"] == sid and m["facts"] == FACTS and m["workload"] == "w1"
    assert (
        all(len(e["chunks"]) == (1 if e["size"] else 0) for e in m["files"]) and m["chunk_bytes"] == 1 << 26
    )
    verify_files(d, m)
    verify_manifest(m, load_trusted_keys(world.trust))
    sid2 = world.publish(images, workload="w2")
    listed = DirectoryStore(world.store).list_snapshots("default", "demo")
    assert [x.manifest["id"] for x in listed] == [sid2, sid]  # newest first, by store time
    assert (
        listed[0].stored_at
        == (world.store / "default" / "demo" / hex_of(sid2) / "manifest.json").stat().st_mtime
    )
    assert DirectoryStore(world.store).list_snapshots("default", "other") == []
    # Per namespace: the same name in another namespace is another set of snapshots.
    sid3 = world.publish(images, namespace="team-b")
    assert [x.manifest["id"] for x in DirectoryStore(world.store).list_snapshots("team-b", "demo")] == [sid3]
    assert sid3 not in {
        x.manifest["id"] for x in DirectoryStore(world.store).list_snapshots("default", "demo")
    }


def test_publish_refuses_bad_input_with_one_line(world: World, tmp_path: Path) -> None:
    images = world.images("a", {"core-1.img": b"core"})
    (images / "link.img").symlink_to("core-1.img")
    out = thaw_cli(
        "publish", "--store", world.store, "--name", "demo", "--workload", "w", "--images", images,
        "--key", world.keys / "signing.key", "--facts", world.facts_file(),
    )  # fmt: skip
    assert out.returncode == 1 and "symlink" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    (images / "link.img").unlink()
    os.mkfifo(images / "pipe.img")  # would block a reader that opened it plainly
    out = thaw_cli(
        "publish", "--store", world.store, "--name", "demo", "--workload", "w", "--images", images,
        "--key", world.keys / "signing.key", "--facts", world.facts_file(),
    )  # fmt: skip
    assert out.returncode == 1 and "FIFO" in out.stderr and "special files are refused" in out.stderr
    out = thaw_cli(
        "publish", "--store", world.store, "--name", "Bad_Name", "--workload", "w", "--images", images,
        "--key", tmp_path / "nokey", "--facts", world.facts_file(),
    )  # fmt: skip
    assert out.returncode == 1 and "cannot read signing key" in out.stderr
    assert (
        not (world.store / "default" / "demo").exists()
        and not (world.store / "default" / "Bad_Name").exists()
    )


def test_listing_skips_malformed_and_misplaced_entries_and_says_why(world: World) -> None:
    sid = world.publish(world.images("a", {"core-1.img": b"core"}))
    name_dir = world.store / "default" / "demo"
    good = name_dir / hex_of(sid)
    junk = name_dir / ("f" * 64)
    junk.mkdir()
    (junk / "manifest.json").write_bytes((good / "manifest.json").read_bytes())  # right manifest, wrong place
    (name_dir / "notes").mkdir()
    problems: list[str] = []
    assert [
        x.manifest["id"] for x in DirectoryStore(world.store).list_snapshots("default", "demo", problems)
    ] == [sid]
    assert any("not what its path says" in p for p in problems)
    assert any("notes" in p for p in problems)
    with pytest.raises(StoreError, match="does not exist"):
        DirectoryStore(world.root / "unmounted").list_snapshots("default", "demo")


LIST_SCRIPT = """
import sys
from pathlib import Path
from thaw.snapshot.store import DirectoryStore
problems = []
listed = DirectoryStore(Path(sys.argv[1])).list_snapshots("default", "demo", problems)
print(len(listed))
for p in problems:
    print(p)
"""


def _list_in_a_child(store: Path) -> list[str]:
    """List in a separate process with a timeout: a listing that blocks fails the test, not the run."""
    out = subprocess.run(
        [sys.executable, "-c", LIST_SCRIPT, str(store)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.splitlines()


def test_a_fifo_or_symlink_as_manifest_never_hangs_a_listing(world: World) -> None:
    """Issue 11.4: a FIFO as manifest.json hung fetch forever; a symlink to /dev/zero ate memory."""
    sid = world.publish(world.images("a", {"core-1.img": b"core"}))
    name_dir = world.store / "default" / "demo"
    fifo_dir, link_dir, dirlink = name_dir / ("a" * 64), name_dir / ("b" * 64), name_dir / ("c" * 64)
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "manifest.json")
    link_dir.mkdir()
    (link_dir / "manifest.json").symlink_to("/dev/zero")
    dirlink.symlink_to(name_dir / hex_of(sid))
    lines = _list_in_a_child(world.store)
    assert lines[0] == "1"
    problems = "\n".join(lines[1:])
    assert "not a regular file" in problems and str(fifo_dir) in problems and str(link_dir) in problems
    assert f"{dirlink}: not a directory (a symlink or a file)" in problems


def test_listing_reads_at_most_the_newest_manifests_each_bounded(world: World) -> None:
    """Issue 11.4: nothing capped how many manifests a listing held, nor (in effect) their size."""
    images = world.images("a", {"core-1.img": b"core"})
    files = hash_files(images)
    name_dir = world.store / "default" / "demo"
    now = time.time()
    ids = []
    for i in range(MAX_LISTED + 8):
        m = build_manifest("demo", "w1", FACTS, files, created=f"2026-01-01T00:00:{i:02d}Z")
        d = name_dir / hex_of(m["id"])
        d.mkdir(parents=True)
        (d / "manifest.json").write_bytes(dump_manifest(m))
        os.utime(d / "manifest.json", (now - 1000 + i, now - 1000 + i))
        ids.append(m["id"])
    huge = name_dir / ("e" * 64)
    huge.mkdir()
    with open(huge / "manifest.json", "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # the newest entry, and too large to be read
    problems: list[str] = []
    listed = DirectoryStore(world.store).list_snapshots("default", "demo", problems)
    assert [x.manifest["id"] for x in listed] == ids[::-1][: MAX_LISTED - 1]  # the huge one took a slot
    assert any(f"only the {MAX_LISTED} newest were read" in p for p in problems)
    assert any(str(huge) in p and "more than the" in p for p in problems)


def _wait_for_partial_publish(store: Path, proc: subprocess.Popen[bytes]) -> Path | None:
    """The publish's temporary directory once it holds a file, or None if the publish ended first."""
    while proc.poll() is None:
        for tmp in (store / "default" / "demo").glob(".tmp-*"):
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
        *thaw_command(), "publish", "--store", str(world.store), "--name", "demo", "--workload", "w1",
        "--images", str(images), "--key", str(world.keys / "signing.key"), "--facts", str(world.facts_file()),
    ]  # fmt: skip
    env = thaw_env()
    for _ in range(5):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        tmp = _wait_for_partial_publish(world.store, proc)
        if tmp is None:  # finished before we saw it half-way: try again with a fresh publish
            proc.communicate()
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            seen = store.list_snapshots("default", "demo")
            for x in seen:  # only earlier, complete publishes
                verify_files(store.snapshot_dir("default", "demo", x.manifest["id"]), x.manifest)
            before = {x.manifest["id"] for x in seen}
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        sid = out.decode().strip()
        assert sid not in before
        after = {x.manifest["id"]: x.manifest for x in store.list_snapshots("default", "demo")}
        verify_files(store.snapshot_dir("default", "demo", sid), after[sid])
        assert not tmp.exists()
        break
    else:
        pytest.fail("publish always finished before a partial state could be observed")

    listed_before = {x.manifest["id"] for x in store.list_snapshots("default", "demo")}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tmp = _wait_for_partial_publish(world.store, proc)
    proc.kill()
    proc.communicate()
    after_kill = store.list_snapshots("default", "demo")
    if tmp is not None:
        assert {x.manifest["id"] for x in after_kill} == listed_before
        assert tmp.exists()  # left for the stale-publish cleanup, invisible to readers
    for x in after_kill:
        verify_files(store.snapshot_dir("default", "demo", x.manifest["id"]), x.manifest)


def test_publish_with_a_cache_keeps_the_nodes_copy_signed(world: World) -> None:
    images = world.images("a", {"pages-1.img": os.urandom(10_000), "core-1.img": b"core"})
    out = thaw_cli(
        "publish", "--store", world.store, "--namespace", "ml", "--name", "demo", "--workload", "w1",
        "--images", images, "--key", world.keys / "signing.key", "--facts", world.facts_file(),
        "--cache", world.cache,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    cached = world.cache / "ml" / "demo" / hex_of(sid)
    assert orjson.loads((cached / "manifest.json").read_bytes())["id"] == sid
    assert (cached / ".signer.pub").read_bytes() == (world.keys / "signing.pub").read_bytes()
    assert (world.store / "ml" / "demo" / hex_of(sid) / "manifest.json").is_file()
