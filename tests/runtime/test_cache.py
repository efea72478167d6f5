"""The node cache as a library (what ``thaw exec`` calls): add_local, in_use, eviction, upkeep."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path

import pytest

from tests.runtime.snapshots import FACTS, World, facts
from thaw.contract.facts import compat_key
from thaw.contract.manifest import Manifest, build_manifest, hash_files
from thaw.snapshot.cache import (
    SnapshotGone,
    StderrProgress,
    add_local,
    clean_stale,
    evict,
    in_use,
    inventory,
    list_cached,
    read_budget,
    remove_incompatible,
    snapshot_path,
    stage,
    write_budget,
)
from thaw.snapshot.store import DigestMismatch, DirectoryStore, publish


def images(tmp_path: Path, tag: str, size: int = 50_000) -> Path:
    d = tmp_path / "img" / tag
    d.mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(size))
    (d / "core-1.img").write_bytes(tag.encode())
    return d


def local_manifest(img: Path, name: str = "demo", f: object = FACTS) -> Manifest:
    return build_manifest(name, "w1", f, hash_files(img))  # type: ignore[arg-type]


def test_add_local_keeps_the_checkpointing_nodes_copy_by_hard_link(tmp_path: Path) -> None:
    img = images(tmp_path, "a")
    m = local_manifest(img)
    cache = tmp_path / "cache"
    path = add_local(cache, m, img)
    assert path == snapshot_path(cache, m)
    assert os.stat(path / "pages-1.img").st_ino == os.stat(img / "pages-1.img").st_ino  # same filesystem
    assert stat.S_IMODE((path / "pages-1.img").stat().st_mode) == 0o600
    assert [e.manifest["id"] for e in list_cached(cache)] == [m["id"]]
    assert add_local(cache, m, img) == path  # idempotent


def test_in_use_holds_off_eviction_and_reports_an_evicted_snapshot(tmp_path: Path) -> None:
    img = images(tmp_path, "a")
    cache = tmp_path / "cache"
    path = add_local(cache, local_manifest(img), img)
    with in_use(path):
        assert evict(path) is False
        assert inventory(cache, FACTS).get("restoring") == 1
    assert evict(path) is True
    assert not path.exists()
    with pytest.raises(SnapshotGone, match="no longer in the node cache"), in_use(path):
        pass
    with pytest.raises(SnapshotGone, match="not in the node cache"), in_use(tmp_path / "nowhere" / "x"):
        pass


def test_stage_refuses_a_store_file_that_differs_and_leaves_no_temp(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    m = publish(store, "demo", "w1", images(tmp_path, "a"), None, FACTS)
    f = store.snapshot_dir("demo", m["id"]) / "pages-1.img"
    f.write_bytes(f.read_bytes() + b"extra")
    cache = tmp_path / "cache"
    with pytest.raises(DigestMismatch, match="larger than"):
        stage(store, m, cache)
    assert sorted(p.name for p in (cache / "demo").iterdir()) == [snapshot_path(cache, m).name + ".fetch"]


def test_clean_stale_removes_only_what_dead_processes_left(tmp_path: Path) -> None:
    img = images(tmp_path, "a")
    cache = tmp_path / "cache"
    path = add_local(cache, local_manifest(img), img)
    name_dir = path.parent
    (name_dir / f".tmp-{'b' * 64}-dead").mkdir()
    (name_dir / f".trash-{'c' * 64}-half").mkdir()
    (name_dir / ("d" * 64 + ".use")).touch()  # lock of a snapshot long gone
    (name_dir / ("e" * 64)).mkdir()  # no manifest: never a whole snapshot
    old_dump, new_dump = cache / ".thaw-dump-old", cache / ".thaw-dump-new"
    old_dump.mkdir()
    new_dump.mkdir()
    os.utime(old_dump, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    removed = clean_stale(cache)
    assert len(removed) == 5
    assert not old_dump.exists() and new_dump.exists()  # a checkpoint may be dumping right now
    assert sorted(p.name for p in name_dir.iterdir()) == sorted(
        [path.name, path.name + ".use", path.name + ".fetch"]
    )


def test_remove_incompatible_and_inventory_lists_only_restorable(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old_m = local_manifest(images(tmp_path, "a"))
    old = add_local(cache, old_m, tmp_path / "img" / "a")
    new_facts = facts(criu="4.3")
    new = add_local(
        cache, local_manifest(images(tmp_path, "b"), name="other", f=new_facts), tmp_path / "img" / "b"
    )
    inv = inventory(cache, new_facts, budget=10**9)
    assert [s["compat"] for s in inv["snapshots"]] == [compat_key(new_facts)]
    assert inv["free_bytes"] <= 10**9 - 2 * 50_001
    assert remove_incompatible(cache, new_facts) == [f"demo/{old_m['id']}"]
    assert not old.exists() and new.exists()


def test_budget_file_and_progress_lines(tmp_path: Path) -> None:
    assert read_budget(tmp_path) is None
    write_budget(tmp_path, 1234)
    assert read_budget(tmp_path) == 1234
    (tmp_path / ".config.json").write_text("{bad")
    assert read_budget(tmp_path) is None
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
