"""Moving snapshot files at line rate: hashed copies and verification on every core.

One engine for the four places bytes move or are checked:

- ``ingest_files``: a dump directory into a new directory, each file read once through a bounded
  descriptor and hashed as it is copied (the whole-file sha256 and the chunk digests each on its
  own thread over the buffers just read and written), so what is hashed is what is stored;
- ``copy_files``: a snapshot's files from a source (the store, or the cache for a publish) into a
  new directory, each chunk read, checked against its digest and written by whichever worker takes
  it (``os.preadv``/``os.pwrite`` at the chunk's offset: no shared file position);
- ``verify_files``: re-hash a snapshot directory against its manifest (the restore's check right
  before CRIU), chunk by chunk in parallel;
- ``hash_files``: the entries of a directory without copying it (tests, tools);
- ``share_files``: a trusted copy (the node cache's, just hashed as it was written) given to a store
  on the same filesystem without writing its bytes again (a reflink, else a hard link), then
  verified chunk by chunk like a copy: a publish writes the image once, not twice;
- ``Tee``: for a store on another mount (a PVC, another hostPath: no link can cross it), the ingest
  writes the store's staging copy from the very buffers it hashed and writes into the cache, so the
  publish reads the dump once and never reads the cache copy back.

hashlib releases the GIL for updates of more than 2 KiB and so do ``preadv``/``pwrite``, so Python
threads use every core. A file without chunk digests (a manifest written before they existed) is
verified with one sequential sha256, files in parallel. Data files are fsynced once, before the
rename that makes the directory visible (what the atomic rename needs); nothing else is.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from thaw.contract.manifest import (
    CHUNK,
    CHUNK_BYTES,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    check_file_path,
)
from thaw.contract.safeio import check_regular, open_beneath, open_dir

Progress = Callable[[int], None]  # called with the number of bytes just moved
SIGNER_NAME = ".signer.pub"  # the public key that signed the manifest, beside it (thaw/snapshot/cache.py)
# Top-level names of a snapshot directory that are not image files.
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNER_NAME})


def default_workers() -> int:
    """Threads for hashing: every core this process may run on, at most 32."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(32, n))


class DigestMismatch(Exception):
    """A file is not what the manifest says (size or sha256); the message names the file."""


class TimedOut(Exception):
    """A deadline passed; the message says what was under way."""


@dataclass(frozen=True)
class Deadline:
    """An absolute ``time.monotonic()`` time; None: no deadline."""

    at: float | None = None

    @staticmethod
    def after(seconds: float | None) -> Deadline:
        return Deadline(None if seconds is None else time.monotonic() + seconds)

    def left(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def check(self, what: str) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise TimedOut(f"deadline passed while {what}")


NO_DEADLINE = Deadline()


class _SafeProgress:
    """A progress callback several threads may call."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.lock = threading.Lock()

    def __call__(self, n: int) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(n)


# --- writeback ---------------------------------------------------------------------------------

_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Callable[..., int] | None = None
try:
    _fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    _fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range = _fn
except (OSError, AttributeError):  # not Linux, or no libc: the final fsync does it all
    pass


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range just written to disk, without waiting (``sync_file_range(WRITE)``), so
    the disk works while the next chunks are hashed and the fsync before the rename finds little
    left to do. Durability still comes from that fsync only."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


# --- units of work ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """One range of one file: verified against ``want`` (hex sha256), copied when ``dst`` is set."""

    entry: FileEntry
    index: int | None  # chunk index, None for the whole file
    src: int
    dst: int | None
    offset: int
    length: int
    want: str


def _describe(p: _Piece) -> str:
    if p.index is None:
        return f"file {p.entry['path']}"
    return f"file {p.entry['path']} chunk {p.index} (bytes {p.offset}..{p.offset + p.length - 1})"


def _do_piece(p: _Piece, buf: bytearray, progress: _SafeProgress, deadline: Deadline) -> None:
    h = hashlib.sha256()
    mv = memoryview(buf)
    pos, end = p.offset, p.offset + p.length
    while pos < end:
        deadline.check(f"reading {p.entry['path']}")
        want = min(len(buf), end - pos)
        n = os.preadv(p.src, [mv[:want]], pos)
        if n <= 0:
            raise DigestMismatch(
                f"{_describe(p)}: ended at byte {pos}, the manifest says {p.entry['size']} bytes"
            )
        data = mv[:n]
        h.update(data)
        if p.dst is not None:
            done = 0
            while done < n:
                done += os.pwrite(p.dst, data[done:], pos + done)
        pos += n
        progress(n)
    got = h.hexdigest()
    if got != p.want:
        raise DigestMismatch(
            f"{_describe(p)} has sha256 {got}, the manifest says {p.want} (tampered or corrupt)"
        )
    if p.dst is not None:
        start_writeback(p.dst, p.offset, p.length)


def _pieces(entry: FileEntry, src: int, dst: int | None, chunk_bytes: int | None) -> Iterator[_Piece]:
    chunks = entry.get("chunks")
    if chunks is not None and chunk_bytes is not None:
        for i, want in enumerate(chunks):
            off = i * chunk_bytes
            yield _Piece(entry, i, src, dst, off, min(chunk_bytes, entry["size"] - off), want)
    else:
        yield _Piece(entry, None, src, dst, 0, entry["size"], entry["sha256"])


def _run(pieces: list[_Piece], workers: int, progress: _SafeProgress, deadline: Deadline) -> None:
    """Run every piece on ``workers`` threads, largest first; the first failure is raised once every
    started piece has stopped (no descriptor is closed under a running piece)."""
    pieces = sorted(pieces, key=lambda p: p.length, reverse=True)
    if workers <= 1 or len(pieces) <= 1:
        buf = bytearray(CHUNK)
        for p in pieces:
            _do_piece(p, buf, progress, deadline)
        return
    failed = threading.Event()
    local = threading.local()

    def one(p: _Piece) -> None:
        if failed.is_set():
            return
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(CHUNK)
        try:
            _do_piece(p, buf, progress, deadline)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(workers, len(pieces)), thread_name_prefix="thaw-hash") as pool:
        futures = [pool.submit(one, p) for p in pieces]
        wait(futures)
    for f in futures:
        exc = f.exception()
        if exc is not None:
            raise exc


# --- verify ----------------------------------------------------------------------------------


def _open_entry(root_fd: int, entry: FileEntry, where: str) -> int:
    try:
        fd = open_beneath(root_fd, entry["path"])
    except FileNotFoundError:
        raise DigestMismatch(f"file {entry['path']} is missing from {where}") from None
    except OSError as exc:
        raise DigestMismatch(f"file {entry['path']} in {where}: {exc.strerror or exc}") from None
    size = os.fstat(fd).st_size
    if size != entry["size"]:
        os.close(fd)
        raise DigestMismatch(f"file {entry['path']} has {size} bytes, the manifest says {entry['size']}")
    return fd


def _extra_entries(root_fd: int, manifest: Manifest) -> list[str]:
    """Paths under the directory that the manifest does not list (reserved top-level names aside)."""
    listed = {e["path"] for e in manifest["files"]}
    dirs = {str(Path(p).parent) for p in listed} - {"."}
    for d in list(dirs):
        parts = d.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    extra: list[str] = []
    for top, subdirs, files, _ in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        rel = top[2:] if top.startswith("./") else ""
        for name in files:
            p = f"{rel}/{name}" if rel else name
            if p not in listed and not (not rel and name in RESERVED_NAMES):
                extra.append(p)
        for name in subdirs:
            p = f"{rel}/{name}" if rel else name
            if p not in dirs:
                extra.append(p + "/")
        subdirs[:] = [d for d in subdirs if (f"{rel}/{d}" if rel else d) in dirs]
    return sorted(extra)


def verify_files(
    directory: Path | int,
    manifest: Manifest,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> None:
    """Re-hash every file of ``manifest`` under ``directory`` (a path or a directory descriptor) on
    ``workers`` threads; DigestMismatch naming the first file that differs, is missing, is not a
    regular file, or is there without being listed."""
    root = directory if isinstance(directory, int) else open_dir(directory)
    where = str(directory) if not isinstance(directory, int) else "the snapshot"
    fds: list[int] = []
    try:
        extra = _extra_entries(root, manifest)
        if extra:
            raise DigestMismatch(f"{where} holds {', '.join(extra[:3])}, which its manifest does not list")
        pieces: list[_Piece] = []
        for e in manifest["files"]:
            fd = _open_entry(root, e, where)
            fds.append(fd)
            pieces.extend(_pieces(e, fd, None, manifest.get("chunk_bytes")))
        _run(pieces, workers or default_workers(), _SafeProgress(progress), NO_DEADLINE)
    finally:
        for fd in fds:
            os.close(fd)
        if not isinstance(directory, int):
            os.close(root)


# --- copy ------------------------------------------------------------------------------------

Opener = Callable[[FileEntry], BinaryIO]  # the source of one file (a store's open_file)


def _parent(dst_root: int, rel: str) -> tuple[int, str]:
    """The directory descriptor that will hold ``rel`` under ``dst_root`` (its directories made,
    0700, none followed through a symlink) and the file's name; close the descriptor unless it is
    ``dst_root``."""
    parts = rel.split("/")
    cur = dst_root
    try:
        for part in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=cur)
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            if cur != dst_root:
                os.close(cur)
            cur = nxt
    except BaseException:
        if cur != dst_root:
            os.close(cur)
        raise
    return cur, parts[-1]


def _create(dst_root: int, rel: str) -> int:
    """A new file ``rel`` (0600) under ``dst_root``, making its directories (0700) on the way."""
    cur, name = _parent(dst_root, rel)
    try:
        return os.open(
            name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=cur
        )
    finally:
        if cur != dst_root:
            os.close(cur)


def _stream_copy(  # noqa: PLR0917
    src: BinaryIO,
    dst: int,
    entry: FileEntry,
    chunk_bytes: int | None,
    progress: _SafeProgress,
    deadline: Deadline,
) -> None:
    """A source without a file descriptor to pread (a network stream): one pass, in order, checking
    the chunk digests (or the whole file's) as they complete."""
    chunks = entry.get("chunks") if chunk_bytes is not None else None
    whole, piece = hashlib.sha256(), hashlib.sha256()
    pos, index = 0, 0
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    while True:
        deadline.check(f"copying {entry['path']}")
        n = _read_into(src, mv)
        if not n:
            break
        if pos + n > entry["size"]:
            raise DigestMismatch(
                f"file {entry['path']} is larger than the {entry['size']} bytes its manifest says"
            )
        data = mv[:n]
        if chunks is None:
            whole.update(data)
        else:
            assert chunk_bytes is not None
            off = 0
            while off < n:
                take = min(n - off, chunk_bytes - (pos + off) % chunk_bytes)
                piece.update(data[off : off + take])
                off += take
                if (pos + off) % chunk_bytes == 0 or pos + off == entry["size"]:
                    got = piece.hexdigest()
                    if got != chunks[index]:
                        raise DigestMismatch(
                            f"file {entry['path']} chunk {index} has sha256 {got}, the manifest says "
                            f"{chunks[index]} (tampered or corrupt)"
                        )
                    index, piece = index + 1, hashlib.sha256()
        done = 0
        while done < n:
            done += os.pwrite(dst, data[done:], pos + done)
        pos += n
        progress(n)
    if pos != entry["size"]:
        raise DigestMismatch(f"file {entry['path']} has {pos} bytes, the manifest says {entry['size']}")
    if chunks is None and whole.hexdigest() != entry["sha256"]:
        raise DigestMismatch(
            f"file {entry['path']} has sha256 {whole.hexdigest()}, the manifest says {entry['sha256']} "
            "(tampered or corrupt)"
        )


def _read_into(src: BinaryIO, mv: memoryview) -> int:
    readinto = getattr(src, "readinto", None)
    if readinto is not None:
        return int(readinto(mv) or 0)
    data = src.read(len(mv))
    mv[: len(data)] = data
    return len(data)


def _regular_fd(src: BinaryIO) -> int | None:
    """The descriptor of a source that is a regular file (pread works), else None."""
    try:
        fd = src.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None


def copy_files(
    manifest: Manifest,
    open_source: Opener,
    dst_dir: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    deadline: Deadline = NO_DEADLINE,
    files: Sequence[FileEntry] | None = None,
) -> None:
    """Copy every file of ``manifest`` (or only ``files``, some of its entries) from
    ``open_source(entry)`` into ``dst_dir`` (empty but for what ``share_files`` put there),
    verifying each chunk (or whole file) as it goes; fsync the files and their directories.
    DigestMismatch, TimedOut or OSError (ENOSPC...) on failure: the caller removes ``dst_dir``."""
    safe = _SafeProgress(progress)
    chunk_bytes = manifest.get("chunk_bytes")
    entries = manifest["files"] if files is None else files
    dst_root = open_dir(dst_dir)
    opened: list[tuple[BinaryIO, int]] = []
    try:
        pieces: list[_Piece] = []
        for e in entries:
            deadline.check(f"opening {e['path']}")
            src = open_source(e)
            dst = _create(dst_root, e["path"])
            opened.append((src, dst))
            fd = _regular_fd(src)
            if fd is None:
                _stream_copy(src, dst, e, chunk_bytes, safe, deadline)
                continue
            size = os.fstat(fd).st_size
            if size != e["size"]:
                raise DigestMismatch(f"file {e['path']} has {size} bytes, the manifest says {e['size']}")
            pieces.extend(_pieces(e, fd, dst, chunk_bytes))
        _run(pieces, workers or default_workers(), safe, deadline)
        _fsync_all([dst for _, dst in opened], workers)
        _fsync_dirs(dst_root, [e["path"] for e in entries])
    finally:
        for src, dst in opened:
            src.close()
            os.close(dst)
        os.close(dst_root)


# --- share -----------------------------------------------------------------------------------

FICLONE = 0x40049409  # ioctl: make the destination a copy-on-write clone of the source (XFS, btrfs)
# What a filesystem answers when it cannot clone or hard-link here: another filesystem (or another
# mount of it), no reflinks, no hard links, too many links, no /proc to link an open file by.
_CANNOT_SHARE = frozenset(
    {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOTTY, errno.EPERM,
     errno.EMLINK, errno.ENOENT, errno.ENOSYS}
)  # fmt: skip


def _share_one(src_root: int, dst_root: int, rel: str, how: str) -> int | None:
    """``rel`` from ``src_root`` into ``dst_root`` by ``how`` ("reflink": a clone, its own inode;
    "link": a hard link to the very inode opened and checked, through ``/proc/self/fd``, so no path
    is looked up twice); a read-only descriptor of the new file, or None when this filesystem cannot
    (nothing left behind)."""
    src = open_beneath(src_root, rel)  # a regular file, no symlink on the way
    try:
        if how == "reflink":
            dst = _create(dst_root, rel)
            try:
                fcntl.ioctl(dst, FICLONE, src)
            except OSError as exc:
                os.close(dst)
                os.unlink(rel, dir_fd=dst_root)
                if exc.errno in _CANNOT_SHARE:
                    return None
                raise
            return dst
        parent, name = _parent(dst_root, rel)
        try:
            os.link(f"/proc/self/fd/{src}", name, dst_dir_fd=parent, follow_symlinks=True)
        except OSError as exc:
            if exc.errno in _CANNOT_SHARE:
                return None
            raise
        finally:
            if parent != dst_root:
                os.close(parent)
        return open_beneath(dst_root, rel)
    finally:
        os.close(src)


def share_files(
    manifest: Manifest,
    src_dir: Path,
    dst_dir: Path,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[FileEntry]:
    """Give the empty directory ``dst_dir`` the files of ``manifest`` from ``src_dir`` without
    writing their bytes again: a reflink where the filesystem has them (its own inode, copy on
    write), else a hard link (the same inode). Only for a source that is trusted and never rewritten
    (the node cache's copy that the publish just hashed as it wrote it) on the filesystem of
    ``dst_dir``. Each shared file is then verified chunk by chunk against the manifest on
    ``workers`` threads, as ``copy_files`` checks what it copies (the destination holds only bytes
    the manifest names), and fsynced with its directories (the clone's or link's metadata; the
    data was made durable when the source was written).

    Returns the entries it could not share (another filesystem, no reflinks nor hard links): the
    caller copies those. DigestMismatch or OSError on failure: the caller removes ``dst_dir``."""
    src_root, dst_root = open_dir(src_dir), open_dir(dst_dir)
    shared: list[tuple[FileEntry, int]] = []
    rest: list[FileEntry] = []
    ways = ["reflink", "link"]
    try:
        for e in manifest["files"]:
            fd = None
            while ways and fd is None:
                fd = _share_one(src_root, dst_root, e["path"], ways[0])
                if fd is None:
                    ways.pop(0)  # this filesystem cannot: never asked again
            if fd is None:
                rest.append(e)
                continue
            shared.append((e, fd))
            size = os.fstat(fd).st_size
            if size != e["size"]:
                raise DigestMismatch(f"file {e['path']} has {size} bytes, the manifest says {e['size']}")
        chunk_bytes = manifest.get("chunk_bytes")
        pieces = [p for e, fd in shared for p in _pieces(e, fd, None, chunk_bytes)]
        _run(pieces, workers or default_workers(), _SafeProgress(progress), NO_DEADLINE)
        if shared:
            _fsync_all([fd for _, fd in shared], workers)
            _fsync_dirs(dst_root, [e["path"] for e, _ in shared])
    finally:
        for _, fd in shared:
            os.close(fd)
        os.close(src_root)
        os.close(dst_root)
    return rest


def _fsync_all(fds: list[int], workers: int | None) -> None:
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    with ThreadPoolExecutor(max_workers=min(len(fds), workers or default_workers())) as pool:
        list(pool.map(os.fsync, fds))


def _fsync_dirs(root: int, paths: list[str]) -> None:
    subdirs = sorted({str(Path(p).parent) for p in paths} - {"."}, reverse=True)
    for d in subdirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(root)


# --- ingest ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    rel: str
    fd: int
    size: int  # at open time; the copy reads to EOF, within the cap


class TooLarge(Exception):
    """The dump is larger than the cap; the message says by how much."""


def _walk_dump(root_fd: int, where: Path) -> Iterator[tuple[str, int]]:
    """(relative path, parent directory descriptor) of every file under the dump, sorted; refuses
    symlinks and special files, and names the first one."""
    for top, subdirs, files, dfd in os.fwalk(".", dir_fd=root_fd, follow_symlinks=False):
        subdirs.sort()
        rel_top = top[2:] if top.startswith("./") else ""
        for d in subdirs:
            st = os.stat(d, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise ManifestError("malformed", f"{where / rel_top / d} is a symlink: not allowed")
        for name in sorted(files):
            rel = f"{rel_top}/{name}" if rel_top else name
            if not rel_top and name in RESERVED_NAMES:
                continue  # republishing a cached snapshot: its manifest and signer are not images
            why = check_file_path(rel)
            if why:
                raise ManifestError("malformed", f"image file {rel!r} cannot be published: {why}")
            yield rel, dfd


def _open_sources(dump: Path, max_bytes: int | None) -> list[_Source]:
    root = open_dir(dump)
    out: list[_Source] = []
    total = 0
    try:
        for rel, dfd in _walk_dump(root, dump):
            name = rel.rsplit("/", 1)[-1]
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ManifestError("malformed", f"{dump / rel} is a symlink: not allowed") from None
                raise
            out.append(_Source(rel, fd, 0))
            try:
                st = check_regular(fd, dump / rel)
            except OSError as exc:
                raise ManifestError(
                    "malformed", f"{exc.strerror} (symlinks and special files are refused)"
                ) from None
            out[-1] = _Source(rel, fd, st.st_size)
            total += st.st_size
            if max_bytes is not None and total > max_bytes:
                raise TooLarge(f"the dump in {dump} holds more than {max_bytes} bytes (at {rel})")
    except BaseException:
        for s in out:
            os.close(s.fd)
        raise
    finally:
        os.close(root)
    if not out:
        for s in out:
            os.close(s.fd)
        raise ManifestError("malformed", f"image directory {dump} holds no files")
    return out


class _Budget:
    """Bytes left under the cap, shared by the files ingested in parallel."""

    def __init__(self, cap: int | None) -> None:
        self.left = cap
        self.lock = threading.Lock()

    def take(self, n: int, what: str) -> None:
        if self.left is None:
            return
        with self.lock:
            self.left -= n
            if self.left < 0:
                raise TooLarge(f"the dump grew past its cap while being read (at {what})")


class _Chunker:
    """Chunk digests of a stream fed in order (runs on its own thread)."""

    def __init__(self, chunk_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.piece = hashlib.sha256()
        self.chunks: list[str] = []
        self.pos = 0

    def feed(self, data: memoryview) -> None:
        off, n = 0, len(data)
        while off < n:
            take = min(n - off, self.chunk_bytes - self.pos % self.chunk_bytes)
            self.piece.update(data[off : off + take])
            off += take
            self.pos += take
            if self.pos % self.chunk_bytes == 0:
                self.chunks.append(self.piece.hexdigest())
                self.piece = hashlib.sha256()

    def finish(self) -> list[str]:
        if self.pos % self.chunk_bytes:
            self.chunks.append(self.piece.hexdigest())
        return self.chunks


class Tee:
    """A second destination of ``ingest_files`` (a directory store's staging directory, made by
    ``make`` once the dump's files are open and checked, so a refused dump leaves the store
    untouched): every buffer read from the dump is written there too, at the same offset, after it
    is handed to the hashers, so both copies are the bytes the digests describe. A failure to write
    there (the store full, gone) abandons the tee and not the ingest: ``error`` holds it, the cache
    copy goes on, and the caller publishes from the cache copy the usual way (which reports the
    store's trouble). ``directory``: what ``make`` made, None before (the caller removes it when
    the publish does not finish)."""

    def __init__(self, make: Callable[[], Path]) -> None:
        self.make = make
        self.directory: Path | None = None
        self.error: OSError | None = None
        self._lock = threading.Lock()

    def fail(self, exc: OSError) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def write(self, fd: int, data: memoryview, pos: int) -> None:
        if self.error is not None:
            return
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], pos + done)
        except OSError as exc:
            self.fail(exc)


def same_mount(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` (directories) are on one mount: where a hard link or a reflink
    between them can work (across two mounts, even of one filesystem, link() fails with EXDEV)."""
    ids: list[tuple[int, int | None]] = []
    for d in (a, b):
        fd = open_dir(d)
        try:
            mnt: int | None = None
            with contextlib.suppress(OSError), open(f"/proc/self/fdinfo/{fd}", "rb") as f:
                for line in f.read(4096).splitlines():
                    if line.startswith(b"mnt_id:"):
                        mnt = int(line.split()[1])
            ids.append((os.fstat(fd).st_dev, mnt))
        finally:
            os.close(fd)
    return ids[0] == ids[1]


def check_files(directory: Path, manifest: Manifest) -> None:
    """The cheap half of ``verify_files``: every file of ``manifest`` is under ``directory``, a
    regular file (no symlink on the way) of the size it says, and nothing else is; DigestMismatch
    naming the first that is not. For a copy whose bytes were written from the buffers that were
    hashed (a ``Tee``), where re-hashing would only re-read what was just written."""
    root = open_dir(directory)
    try:
        extra = _extra_entries(root, manifest)
        if extra:
            raise DigestMismatch(
                f"{directory} holds {', '.join(extra[:3])}, which its manifest does not list"
            )
        for e in manifest["files"]:
            os.close(_open_entry(root, e, str(directory)))
    finally:
        os.close(root)


RING = 8  # read-ahead buffers per file being ingested (CHUNK each)
WRITEBACK_BYTES = 64 << 20  # written data handed to the disk in pieces this large


def _ingest_one(  # noqa: PLR0917
    s: _Source,
    dst: int | None,
    chunk_bytes: int,
    progress: _SafeProgress,
    budget: _Budget,
    deadline: Deadline,
    tee: tuple[Tee, int] | None = None,
) -> FileEntry:
    """Read ``s`` once, to EOF, and write it here (and to ``tee``'s descriptor); the whole-file
    sha256 and the chunk digests each on a helper thread, in order, over the same buffers (three
    stages in parallel: a file goes at the speed of one sha256 stream). Returns its entry (size is
    what was read, not what fstat said at open)."""
    whole = hashlib.sha256()
    chunker = _Chunker(chunk_bytes)
    ring = [bytearray(CHUNK) for _ in range(RING)]
    busy: list[tuple[Future[None], Future[None]] | None] = [None] * RING
    pos = 0
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="thaw-sha") as seq,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="thaw-chunks") as chunked,
    ):
        try:
            i = 0
            while True:
                deadline.check(f"ingesting {s.rel}")
                slot = i % RING
                prev = busy[slot]
                if prev is not None:
                    prev[0].result()  # both hashers are done with this buffer
                    prev[1].result()
                mv = memoryview(ring[slot])
                n = os.readv(s.fd, [mv])
                if n == 0:
                    break
                budget.take(n, s.rel)
                data = mv[:n]
                busy[slot] = (seq.submit(whole.update, data), chunked.submit(chunker.feed, data))
                done = 0 if dst is not None else n
                while done < n:
                    done += os.pwrite(dst, data[done:], pos + done)  # type: ignore[arg-type]
                if tee is not None:
                    tee[0].write(tee[1], data, pos)  # the buffer the hashers have: the same bytes
                pos += n
                if dst is not None and pos % WRITEBACK_BYTES < n:
                    start_writeback(dst, pos - pos % WRITEBACK_BYTES - WRITEBACK_BYTES, WRITEBACK_BYTES)
                    if tee is not None and tee[0].error is None:
                        start_writeback(
                            tee[1], pos - pos % WRITEBACK_BYTES - WRITEBACK_BYTES, WRITEBACK_BYTES
                        )
                progress(n)
                i += 1
        finally:
            for b in busy:
                if b is not None:
                    b[0].exception()  # wait: no buffer is reused or freed under a hasher
                    b[1].exception()
    entry: FileEntry = {"path": s.rel, "size": pos, "sha256": whole.hexdigest(), "chunks": chunker.finish()}
    return entry


def ingest_files(
    dump: Path,
    dst_dir: Path,
    *,
    max_bytes: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    workers: int | None = None,
    progress: Progress | None = None,
    deadline: Deadline = NO_DEADLINE,
    before_copy: Callable[[int], None] | None = None,
    tee: Tee | None = None,
) -> list[FileEntry]:
    """Copy every regular file under ``dump`` into the empty directory ``dst_dir`` (0600 files, 0700
    directories), reading each once through a descriptor opened ``O_NOFOLLOW|O_NONBLOCK`` and
    checked to be a regular file, hashing what it copies; fsync what the rename of ``dst_dir`` needs.
    Returns the entries (sorted by path) with whole-file and chunk digests.

    ``tee``: the same bytes also into the new directory ``tee.make()`` (same modes), from the same
    buffers, fsynced with its directories too; a write there that fails sets ``tee.error`` and
    stops the tee, not the ingest.

    ``max_bytes`` caps the dump (TooLarge); ``before_copy(total)`` is called with the bytes found at
    open time, before anything is copied (to make room in a cache). ManifestError for symlinks,
    special files or names a manifest cannot hold; OSError (ENOSPC...) from writing."""
    sources = _open_sources(dump, max_bytes)
    dst_root: int | None = None
    dsts: list[int] = []
    tee_root: int | None = None
    tees: list[int] = []
    try:
        if before_copy is not None:
            before_copy(sum(s.size for s in sources))
        dst_root = open_dir(dst_dir)
        for s in sources:
            dsts.append(_create(dst_root, s.rel))
        if tee is not None:
            try:
                tee.directory = tee.make()
                tee_root = open_dir(tee.directory)
                for s in sources:
                    tees.append(_create(tee_root, s.rel))
            except OSError as exc:
                tee.fail(exc)
        teed = tee is not None and tee.error is None
        safe, budget = _SafeProgress(progress), _Budget(max_bytes)
        n = workers or default_workers()
        jobs = [
            (s, d, (tee, tees[i]) if teed and tee is not None else None)
            for i, (s, d) in enumerate(zip(sources, dsts, strict=True))
        ]
        if n < 4 or len(jobs) == 1:
            entries = [_ingest_one(s, d, chunk_bytes, safe, budget, deadline, t) for s, d, t in jobs]
        else:
            # Three threads per file (read and write, whole-file sha256, chunk digests).
            with ThreadPoolExecutor(max_workers=max(1, n // 3), thread_name_prefix="thaw-ingest") as pool:
                futs = [
                    pool.submit(_ingest_one, s, d, chunk_bytes, safe, budget, deadline, t) for s, d, t in jobs
                ]
                wait(futs)
                entries = [f.result() for f in futs]
        _fsync_all(dsts, workers)
        _fsync_dirs(dst_root, [s.rel for s in sources])
        if tee is not None and tee_root is not None and tee.error is None:
            try:  # the store's copy durable before its rename, as the cache's
                _fsync_all(tees, workers)
                _fsync_dirs(tee_root, [s.rel for s in sources])
            except OSError as exc:
                tee.fail(exc)
    finally:
        for s in sources:
            os.close(s.fd)
        for d in (*dsts, *tees):
            os.close(d)
        for r in (dst_root, tee_root):
            if r is not None:
                os.close(r)
    return sorted(entries, key=lambda e: e["path"])


def hash_files(
    images: Path, *, chunk_bytes: int = CHUNK_BYTES, workers: int | None = None
) -> list[FileEntry]:
    """The entries ``ingest_files`` would record for ``images``, without copying it (bounded opens,
    symlinks and special files refused)."""
    sources = _open_sources(images, None)
    try:
        safe, budget = _SafeProgress(None), _Budget(None)
        entries = [_ingest_one(s, None, chunk_bytes, safe, budget, NO_DEADLINE) for s in sources]
    finally:
        for s in sources:
            os.close(s.fd)
    return sorted(entries, key=lambda e: e["path"])
