"""Publish writes the image once (issue 12, "fetch and publish at line rate"): the node cache's copy,
hashed as it was written, is given to a directory store on the same filesystem by reflink or hard
link instead of a second copy; every shared file is still checked against the signed manifest, a
store on another filesystem still gets a verified copy, a scratch copy the workload might reach is
never shared, and a failure leaves nothing under the snapshot's name."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.needs import require
from tests.runtime.snapshots import FACTS
from tests.runtime.test_ingest import dump
from thaw.contract.manifest import verify_manifest
from thaw.contract.signing import TrustedKeys, key_id
from thaw.snapshot.ingest import ingest, publish_dump
from thaw.snapshot.store import DirectoryStore
from thaw.snapshot.transfer import DigestMismatch, hash_files, share_files, verify_files

MIB = 1 << 20
KEY = Ed25519PrivateKey.generate()
TRUSTED = TrustedKeys("test", {key_id(KEY.public_key()): KEY.public_key()})
FILES = ("core-1.img", "pages-1.img", "podfiles/0001")  # what test_ingest.dump writes


def fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def test_a_store_on_the_caches_filesystem_shares_the_copy_that_was_signed(tmp_path: Path) -> None:
    """Before: the image was written twice on the same disk (cache, then store), so publish ran at
    half the disk's write rate. Now the store's files are the cache's (one write), and what is
    stored is exactly what the signature covers."""
    store = DirectoryStore(tmp_path / "store")
    done = publish_dump(
        store, dump(tmp_path), cache_dir=tmp_path / "cache", namespace="ml", name="demo", workload="w1",
        facts=FACTS, key=KEY,
    )  # fmt: skip
    m = done.manifest
    verify_manifest(m, TRUSTED)
    stored = store.snapshot_dir("ml", "demo", m["id"])
    assert done.cached is not None
    verify_files(stored, m)
    assert hash_files(stored) == m["files"]  # the signed digests are those of the stored bytes
    for rel in FILES:
        s, c = os.stat(stored / rel), os.stat(done.cached / rel)
        assert s.st_mode & 0o777 == 0o600
        if fs_type(tmp_path) in ("ext2/ext3", "tmpfs"):  # no reflinks: a hard link, one inode
            assert (s.st_ino, s.st_dev) == (c.st_ino, c.st_dev) and s.st_nlink == 2, rel
        else:  # a reflink (its own inode) or a hard link
            assert s.st_ino != c.st_ino or s.st_nlink == 2, rel
    # Evicting the node's copy leaves the store whole.
    shutil.rmtree(done.cached)
    verify_files(stored, m)


def test_a_shared_file_that_differs_from_the_manifest_fails_the_put_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """Sharing skips the second copy, not the check: a cache copy that changed after it was hashed
    (corruption, a bug) is refused as a copy would refuse it, and the store keeps nothing of it."""
    done = ingest(dump(tmp_path), tmp_path / "cache", namespace="ml", name="demo", workload="w1",
                  facts=FACTS, key=KEY)  # fmt: skip
    fd = os.open(done.path / "pages-1.img", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 16, MIB + 5)  # inside chunk 0 (64 MiB chunks)
    finally:
        os.close(fd)
    store = DirectoryStore(tmp_path / "store")
    for share in (True, False):
        with pytest.raises(
            DigestMismatch, match=r"pages-1\.img chunk 0 .* has sha256 .* \(tampered or corrupt\)"
        ):
            store.put("ml", done.manifest, done.path, share=share)
        assert store.list_snapshots("ml", "demo") == []
        assert list((tmp_path / "store" / "ml" / "demo").iterdir()) == []  # no temporary left either


def test_a_symlink_in_place_of_a_cached_file_is_refused_not_followed(tmp_path: Path) -> None:
    done = ingest(dump(tmp_path), tmp_path / "cache", namespace="ml", name="demo", workload="w1",
                  facts=FACTS, key=KEY)  # fmt: skip
    secret = tmp_path / "secret"
    secret.write_bytes(b"core")
    (done.path / "core-1.img").unlink()
    (done.path / "core-1.img").symlink_to(secret)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(OSError, match="symlink"):
        share_files(done.manifest, done.path, dst)
    assert os.stat(secret).st_nlink == 1


@pytest.fixture
def other_fs() -> Iterator[Path]:
    """A directory on another filesystem than the test's tmp_path (/dev/shm, a tmpfs)."""
    shm = Path("/dev/shm")
    require(None if shm.is_dir() and os.access(shm, os.W_OK) else "a writable /dev/shm (tmpfs)")
    d = Path(tempfile.mkdtemp(prefix="thaw-share-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_store_on_another_filesystem_gets_a_verified_copy(tmp_path: Path, other_fs: Path) -> None:
    require(None if os.stat(other_fs).st_dev != os.stat(tmp_path).st_dev else "/dev/shm on another fs")
    store = DirectoryStore(other_fs / "store")
    done = publish_dump(
        store, dump(tmp_path), cache_dir=tmp_path / "cache", namespace="ml", name="demo", workload="w1",
        facts=FACTS, key=KEY,
    )  # fmt: skip
    stored = store.snapshot_dir("ml", "demo", done.manifest["id"])
    verify_files(stored, done.manifest)
    for rel in FILES:
        assert os.stat(stored / rel).st_nlink == 1 and os.stat(stored / rel).st_mode & 0o777 == 0o600


def test_a_scratch_copy_beside_the_dump_is_copied_never_shared(tmp_path: Path) -> None:
    """Without a node cache the copy goes into a temporary directory beside the dump, which the
    workload may reach (thaw exec run by hand): the store never shares its inodes."""
    store = DirectoryStore(tmp_path / "store")
    done = publish_dump(store, dump(tmp_path), cache_dir=None, namespace="ml", name="demo",
                        workload="w1", facts=FACTS, key=KEY)  # fmt: skip
    stored = store.snapshot_dir("ml", "demo", done.manifest["id"])
    verify_files(stored, done.manifest)
    assert done.cached is None and not list(tmp_path.glob(".thaw-publish-*"))
    assert all(os.stat(stored / rel).st_nlink == 1 for rel in FILES)
