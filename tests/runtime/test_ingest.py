"""Publishing a dump (thaw.snapshot.ingest): into the node cache hashed as it is copied, signed,
then into the store from that verified copy (issue 11.2, the store side; 11.6, budget and clean-up)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.runtime.snapshots import FACTS, REPO
from thaw.contract.manifest import verify_manifest
from thaw.contract.signing import TrustedKeys, key_id
from thaw.snapshot.cache import CacheFull, clean_stale, list_cached, pin
from thaw.snapshot.ingest import IngestError, ingest, publish_dump
from thaw.snapshot.store import DirectoryStore
from thaw.snapshot.transfer import verify_files

MIB = 1 << 20
KEY = Ed25519PrivateKey.generate()
TRUSTED = TrustedKeys("test", {key_id(KEY.public_key()): KEY.public_key()})
UID = "5d3c1a2b-9f8e-4d7c-8b6a-0f1e2d3c4b5a"


def dump(tmp_path: Path, size: int = 2 * MIB, name: str = "dump") -> Path:
    d = tmp_path / name
    (d / "podfiles").mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(size))
    (d / "core-1.img").write_bytes(b"core")
    (d / "podfiles" / "0001").write_bytes(b"a file of the pod")
    return d


def test_what_is_signed_is_what_is_stored_even_while_the_dump_is_rewritten(tmp_path: Path) -> None:
    """Issue 11.2: the dump was hashed only at publish, so a loop rewriting pages-1.img between the
    dump and the publish got its bytes signed with the victim's key, and a rewrite between hashing
    and copying failed the publish. Now each byte is read once, hashed and stored together: the
    store holds exactly what the signature covers, whatever the writer does meanwhile."""
    d = dump(tmp_path, 64 * MIB)
    stop = threading.Event()

    def rewrite() -> None:
        fd = os.open(d / "pages-1.img", os.O_WRONLY)
        try:
            while not stop.is_set():
                os.pwrite(fd, os.urandom(4096), int.from_bytes(os.urandom(3)) % (64 * MIB - 4096))
        finally:
            os.close(fd)

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        store = DirectoryStore(tmp_path / "store")
        done = publish_dump(
            store,
            d,
            cache_dir=tmp_path / "cache",
            namespace="ml",
            name="demo",
            workload="w1",
            facts=FACTS,
            key=KEY,
        )
    finally:
        stop.set()
        writer.join()
    m = done.manifest
    verify_manifest(m, TRUSTED)
    assert done.cached is not None
    verify_files(done.cached, m)
    verify_files(store.snapshot_dir("ml", "demo", m["id"]), m)
    assert [x.manifest["id"] for x in store.list_snapshots("ml", "demo")] == [m["id"]]
    assert sorted(e["path"] for e in m["files"]) == ["core-1.img", "pages-1.img", "podfiles/0001"]


def test_the_dump_is_read_bounded_and_refused_whole(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kw = {"namespace": "ml", "name": "demo", "workload": "w1", "facts": FACTS, "key": KEY}
    d = dump(tmp_path)
    os.mkfifo(d / "pages-2.img")  # a plain open would block forever
    with pytest.raises(Exception, match=r"pages-2\.img is a FIFO"):
        ingest(d, cache, **kw)  # type: ignore[arg-type]
    (d / "pages-2.img").unlink()
    (d / "pages-2.img").symlink_to("/etc/passwd")
    with pytest.raises(Exception, match="symlink"):
        ingest(d, cache, **kw)  # type: ignore[arg-type]
    (d / "pages-2.img").unlink()
    with pytest.raises(IngestError, match="more than 1048576 bytes"):
        ingest(d, cache, max_bytes=MIB, **kw)  # type: ignore[arg-type]
    assert list_cached(cache) == [] and not list((cache / "ml" / "demo").glob(".tmp-*"))
    done = ingest(d, cache, max_bytes=4 * MIB, **kw)  # type: ignore[arg-type]
    assert (done.path / ".signer.pub").is_file()
    assert [e.manifest["id"] for e in list_cached(cache)] == [done.manifest["id"]]


def test_the_gpu_layout_is_read_from_the_copy_that_is_signed(tmp_path: Path) -> None:
    d = dump(tmp_path)
    layout = {"count": 1, "ranks": [{"pid": 4100, "env": {}, "gpus": [0]}]}
    (d / "thaw-exec.json").write_bytes(orjson.dumps({"format": 1, "gpu": layout}))
    done = ingest(d, tmp_path / "cache", namespace="ml", name="demo", workload="w1", facts=FACTS, key=None)
    assert done.manifest["gpu"] == layout
    assert "signature" not in done.manifest and not (done.path / ".signer.pub").exists()


def test_the_budget_is_checked_before_anything_is_copied(tmp_path: Path) -> None:
    """Issue 11.6: nothing checked the budget before a dump was taken into the cache."""
    cache = tmp_path / "cache"
    first = ingest(
        dump(tmp_path, name="a"), cache, namespace="ml", name="demo", workload="w1", facts=FACTS, key=KEY
    )
    pin(first.path, UID)  # a pod is about to restore it: never evicted to make room
    with pytest.raises(CacheFull, match="in use or pinned could not be evicted"):
        ingest(
            dump(tmp_path, name="b"), cache, namespace="ml", name="demo", workload="w1", facts=FACTS, key=KEY,
            budget=3 * MIB,
        )  # fmt: skip
    assert [e.path for e in list_cached(cache)] == [first.path]
    assert not list((cache / "ml" / "demo").glob(".tmp-*"))


INGEST = """
import sys
from pathlib import Path
from tests.runtime.snapshots import FACTS
from thaw.snapshot.ingest import ingest
dump, cache = Path(sys.argv[1]), Path(sys.argv[2])
ingest(dump, cache, namespace="ml", name="demo", workload="w1", facts=FACTS, key=None)
"""


def test_a_killed_publisher_leaves_a_temp_that_the_next_pass_removes(tmp_path: Path) -> None:
    """Issue 11.6: a checkpoint killed mid-dump left its copy in the cache for 24 h."""
    d = dump(tmp_path, 256 * MIB)
    cache = tmp_path / "cache"
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", INGEST, str(d), str(cache)], cwd=REPO)
        tmp = None
        while proc.poll() is None and tmp is None:
            tmp = next((t for t in cache.glob("ml/demo/.tmp-*") if (t / "pages-1.img").exists()), None)
            time.sleep(0.001)
        if tmp is None:
            proc.wait()
            for e in list_cached(cache):
                subprocess.run(["rm", "-rf", str(e.path)], check=True)
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert list_cached(cache) == []
        assert str(tmp) in clean_stale(cache)  # its writer's flock is gone: removed at once
        assert not tmp.exists()
        return
    pytest.fail("ingest always finished before it could be killed midway")
