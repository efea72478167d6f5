"""Publish reads the dump once when the store is on another mount (issue 12): in a pod the node
cache and the store (a PVC, another hostPath) are separate volumes, so no link crosses them (EXDEV
even on one disk) and the store's copy used to be a second pass reading the cache copy back. Now
the ingest writes the store's staging copy from the buffers it hashes (a tee), and the signed put
finishes it: one read, the same digests for both copies, nothing partial on any failure.

The "other mount" is a bind mount (root; CI is root), as a pod's second volume is."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.needs import require, root
from tests.runtime.snapshots import FACTS
from tests.runtime.test_ingest import dump
from thaw.contract.manifest import Manifest, verify_manifest
from thaw.contract.signing import TrustedKeys, key_id
from thaw.snapshot.ingest import ingest, publish_dump
from thaw.snapshot.store import DirectoryStore, StoreError
from thaw.snapshot.transfer import DigestMismatch, Progress, Tee, hash_files, same_mount, verify_files

MIB = 1 << 20
KEY = Ed25519PrivateKey.generate()
TRUSTED = TrustedKeys("test", {key_id(KEY.public_key()): KEY.public_key()})
FILES = ("core-1.img", "pages-1.img", "podfiles/0001")  # what test_ingest.dump writes


class NoCopyStore(DirectoryStore):
    """A directory store whose copy from the cache (``put``) must not happen: the tee wrote it."""

    def put(
        self,
        namespace: str,
        manifest: Manifest,
        snapshot_dir: Path,
        progress: Progress | None = None,
        *,
        share: bool = False,
    ) -> None:
        raise AssertionError(f"the store's copy was read back from {snapshot_dir}")


def _mount(args: list[str], target: Path) -> None:
    require(root("mount"))
    target.mkdir(parents=True)
    r = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, check=False)
    require(
        None if r.returncode == 0 else f"mount {' '.join(args)} is not permitted here: {r.stderr.strip()}"
    )


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.fixture
def other_mount(tmp_path: Path) -> Iterator[Path]:
    """A directory of tmp_path's filesystem seen through a bind mount: a link into it fails with
    EXDEV, as between a pod's cache and store volumes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mnt = tmp_path / "mnt"
    _mount(["--bind", str(disk)], mnt)
    try:
        (tmp_path / "probe").write_bytes(b"x")
        with pytest.raises(OSError) as err:
            os.link(tmp_path / "probe", mnt / "probe")
        assert err.value.errno == errno.EXDEV
        yield mnt
    finally:
        _umount(mnt)


def _leftovers(store_root: Path) -> list[str]:
    return sorted(str(p.relative_to(store_root)) for p in store_root.rglob("*") if p.name.startswith("."))


def test_a_store_on_another_mount_is_written_from_the_one_read_of_the_dump(
    tmp_path: Path, other_mount: Path
) -> None:
    """Before: the cache copy was read back and written to the store (two passes, publish at about
    half the disk's rate in a pod). Now the store's copy comes from the ingest's own buffers: the
    dump is read once (progress counts its bytes once), nothing reads the cache copy back (``put`` is
    never called), and the store holds exactly the signed bytes."""
    assert not same_mount(tmp_path, other_mount)
    store = NoCopyStore(other_mount / "store")
    moved: list[int] = []
    done = publish_dump(
        store, dump(tmp_path, 9 * MIB), cache_dir=tmp_path / "cache", namespace="ml", name="demo",
        workload="w1", facts=FACTS, key=KEY, progress=moved.append,
    )  # fmt: skip
    m = done.manifest
    verify_manifest(m, TRUSTED)
    assert sum(moved) == m["total_bytes"]
    stored = store.snapshot_dir("ml", "demo", m["id"])
    assert [x.manifest["id"] for x in store.list_snapshots("ml", "demo")] == [m["id"]]
    verify_files(stored, m)
    assert hash_files(stored) == m["files"]  # the signed digests are those of the stored bytes
    assert done.cached is not None
    verify_files(done.cached, m)  # the node's copy too: the same buffers
    for rel in FILES:
        st = os.stat(stored / rel)
        assert st.st_nlink == 1 and st.st_mode & 0o777 == 0o600, rel
    assert _leftovers(other_mount / "store") == []


def test_a_store_on_the_caches_mount_still_shares_rather_than_tees(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    assert not store.tees_from("ml", "demo", tmp_path / "cache")  # neither made yet: their parents'
    assert not (tmp_path / "store").exists()
    done = publish_dump(store, dump(tmp_path), cache_dir=tmp_path / "cache", namespace="ml",
                        name="demo", workload="w1", facts=FACTS, key=KEY)  # fmt: skip
    stored = store.snapshot_dir("ml", "demo", done.manifest["id"])
    assert done.cached is not None
    s, c = os.stat(stored / "pages-1.img"), os.stat(done.cached / "pages-1.img")
    assert s.st_ino != c.st_ino or s.st_nlink == 2  # a reflink or a hard link, never a third write


def test_a_failure_mid_copy_leaves_nothing_in_the_store(tmp_path: Path, other_mount: Path) -> None:
    store = DirectoryStore(other_mount / "store")
    seen: list[int] = []

    def fail_after_a_chunk(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise RuntimeError("stopped mid-copy")

    with pytest.raises(RuntimeError, match="stopped mid-copy"):
        publish_dump(
            store, dump(tmp_path, 16 * MIB), cache_dir=tmp_path / "cache", namespace="ml", name="demo",
            workload="w1", facts=FACTS, key=KEY, progress=fail_after_a_chunk,
        )  # fmt: skip
    assert store.list_snapshots("ml", "demo") == []
    assert list((other_mount / "store" / "ml" / "demo").iterdir()) == []  # no staging directory either


def test_a_store_that_fills_mid_copy_gets_nothing_and_the_cache_keeps_its_copy(tmp_path: Path) -> None:
    """The store's trouble is the store's: a tee that cannot write (ENOSPC) is dropped, the cache's
    copy completes, and the put from it reports the store's error; the store keeps nothing."""
    small = tmp_path / "small"
    _mount(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"], small)
    try:
        store = DirectoryStore(small / "store")
        with pytest.raises(OSError) as err:
            publish_dump(store, dump(tmp_path, 8 * MIB), cache_dir=tmp_path / "cache", namespace="ml",
                         name="demo", workload="w1", facts=FACTS, key=KEY)  # fmt: skip
        assert err.value.errno == errno.ENOSPC
        assert list((small / "store" / "ml" / "demo").iterdir()) == []
        cached = [p for p in (tmp_path / "cache" / "ml" / "demo").iterdir() if p.is_dir()]
        assert len(cached) == 1 and (cached[0] / "manifest.json").is_file()  # beside its lock files
    finally:
        _umount(small)


@pytest.mark.parametrize("change", ["truncated", "extra file"])
def test_a_staged_copy_that_is_not_the_manifests_files_is_refused_and_removed(
    tmp_path: Path, other_mount: Path, change: str
) -> None:
    """``finish_put`` does not re-hash (the bytes came from the hashed buffers) but checks the
    staged tree is exactly the manifest's files at their sizes before the rename."""
    store = DirectoryStore(other_mount / "store")
    assert store.tees_from("ml", "demo", tmp_path)
    tee = Tee(lambda: store.begin_put("ml", "demo"))
    done = ingest(dump(tmp_path), tmp_path / "cache", namespace="ml", name="demo", workload="w1",
                  facts=FACTS, key=KEY, tee=tee)  # fmt: skip
    staging = tee.directory
    assert tee.error is None and staging is not None
    if change == "truncated":
        os.truncate(staging / "pages-1.img", MIB)
    else:
        (staging / "podfiles" / "0002").write_bytes(b"not signed")
    with pytest.raises(DigestMismatch, match=r"pages-1\.img has 1048576 bytes|podfiles/0002"):
        store.finish_put("ml", done.manifest, staging)
    assert not staging.exists()
    assert store.list_snapshots("ml", "demo") == []


def test_a_staging_directory_must_be_the_stores_own(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path / "store")
    elsewhere = Path(tempfile.mkdtemp(dir=tmp_path))
    done = ingest(dump(tmp_path), tmp_path / "cache", namespace="ml", name="demo", workload="w1",
                  facts=FACTS, key=KEY)  # fmt: skip
    with pytest.raises(StoreError, match="is not a staging directory"):
        store.finish_put("ml", done.manifest, elsewhere)
    assert elsewhere.is_dir()  # not removed: not the store's
