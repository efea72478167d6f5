"""Bounded reads of files in shared places (the node cache, the store, ``.outcomes``, the plan).

Any place another process can write may hold a FIFO (an ``open`` for reading blocks until a writer
comes), a symlink (to ``/dev/zero``, to another tenant's file), or a file of any size. Every read
of such a place goes through these functions:

- ``open_regular``: ``O_RDONLY|O_NOFOLLOW|O_NONBLOCK|O_CLOEXEC`` (a FIFO opens at once, a symlink
  fails with ELOOP), then ``fstat``: anything but a regular file, or one over the size cap, is
  refused with an ``OSError`` whose message names the path and what it is;
- ``open_beneath``: the same for a relative path under a directory, walking every component with
  ``O_NOFOLLOW`` (a symlinked directory on the way is refused, not followed);
- ``read_bounded``: the whole content of a regular file of at most ``max_bytes`` bytes (a file that
  grows past the cap while being read is refused too).

And the one atomic write (``write_atomic``) of every file a reader may look at while it is replaced.

``O_NONBLOCK`` stays set on the returned descriptor: it changes nothing for regular files.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(fd: int, what: str | os.PathLike[str], max_bytes: int | None = None) -> os.stat_result:
    """``fstat(fd)``: a regular file of at most ``max_bytes``, or OSError naming ``what``."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"{what} is {_kind(st.st_mode)}, not a regular file", str(what))
    if max_bytes is not None and st.st_size > max_bytes:
        raise OSError(
            errno.EFBIG, f"{what} has {st.st_size} bytes, more than the {max_bytes} allowed", str(what)
        )
    return st


def open_regular(
    path: str | os.PathLike[str], max_bytes: int | None = None, *, dir_fd: int | None = None
) -> int:
    """A read-only descriptor of the regular file ``path`` (never through a symlink, never blocking
    on a FIFO). OSError (ELOOP for a symlink, EINVAL for anything not regular, EFBIG over the cap)."""
    try:
        fd = os.open(path, READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symlink: not followed", str(path)) from None
        raise
    try:
        check_regular(fd, path, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_dir(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> int:
    """A descriptor of the directory ``path`` itself (ELOOP/ENOTDIR when it is a symlink or not a
    directory)."""
    try:
        return os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symlink: not followed", str(path)) from None
        raise


def open_beneath(root: int | str | os.PathLike[str], rel: str, max_bytes: int | None = None) -> int:
    """``open_regular`` of ``rel`` (POSIX separators, no '..': manifest paths are checked for that)
    under ``root`` (a directory descriptor or path), with no symlink followed on the way."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"{rel!r} is not a plain relative path", rel)
    own = not isinstance(root, int)
    cur = open_dir(root) if not isinstance(root, int) else root
    try:
        for part in parts[:-1]:
            nxt = open_dir(part, dir_fd=cur)
            if cur != root:
                os.close(cur)
            cur = nxt
        return open_regular(parts[-1], max_bytes, dir_fd=cur)
    finally:
        if cur != root or own:
            os.close(cur)


def read_fd(fd: int, max_bytes: int, what: str | os.PathLike[str]) -> bytes:
    """Everything ``fd`` holds from its offset, refusing more than ``max_bytes``."""
    chunks: list[bytes] = []
    total = 0
    while True:
        b = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        total += len(b)
        if total > max_bytes:
            raise OSError(errno.EFBIG, f"{what} grew past the {max_bytes} bytes allowed", str(what))


def read_bounded(path: str | os.PathLike[str], max_bytes: int, *, dir_fd: int | None = None) -> bytes:
    """The content of the regular file ``path``, at most ``max_bytes`` (OSError otherwise)."""
    fd = open_regular(path, max_bytes, dir_fd=dir_fd)
    try:
        return read_fd(fd, max_bytes, path)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600, fsync: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file, none, or the whole new
    one. Written first beside it under an unpredictable dot-name (mkstemp: created exclusively, never
    through a symlink), given ``mode``, fsynced when ``fsync``, then renamed over ``path``; the
    temporary file is removed if anything fails."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    """fsync a directory: what makes a rename inside it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
