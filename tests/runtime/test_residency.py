"""The page-cache residency probe behind the ``memory`` tier: real files, real page cache
(written pages are resident; ``POSIX_FADV_DONTNEED`` after ``fsync`` drops them on a disk
filesystem)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.needs import require
from thaw.snapshot.cache import _fs_type
from thaw.snapshot.residency import PAGE, resident_bytes, resident_fraction

MIB = 1 << 20


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk filesystem: the test's own, or one under /var/tmp or the repository
    where the temporary directory is in memory (its pages could never leave the page cache)."""
    for parent in (tmp_path, Path("/var/tmp"), REPO):
        if _fs_type(parent) not in ("tmpfs", "ramfs"):
            break
    else:
        require("no disk filesystem here (tmp, /var/tmp and the repository are all in memory)")
    d = Path(tempfile.mkdtemp(prefix="thaw-residency-", dir=parent))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def write(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    return path


def drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_written_pages_are_resident_and_dropped_ones_are_not(disk_dir: Path) -> None:
    f = write(disk_dir / "pages-1.img", 8 * MIB + 123)
    assert resident_bytes(f) == (8 * MIB + 123, 8 * MIB + 123)
    drop(f)
    have, size = resident_bytes(f)
    assert size == 8 * MIB + 123 and have <= 2 * PAGE  # DONTNEED is advice: allow a straggler page
    with open(f, "rb") as r:  # reading half brings half back
        # Readahead is off for this descriptor (FADV_RANDOM); the kernel may still round up, and
        # CI's disk read ahead 72 pages once, so the bound only says "about half, not all".
        os.posix_fadvise(r.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        r.read(4 * MIB)
    assert 4 * MIB <= resident_bytes(f)[0] <= 5 * MIB


def test_fraction_over_a_snapshots_files(disk_dir: Path) -> None:
    a, b = write(disk_dir / "a.img", 3 * MIB), write(disk_dir / "b.img", MIB)
    drop(b)
    assert resident_fraction([a, b]) == pytest.approx(0.75, abs=0.01)
    assert resident_fraction([write(disk_dir / "empty.img", 0)]) == 0.0
    assert resident_fraction([disk_dir / "missing.img"]) == 0.0  # unreadable: "disk", the safe answer
