"""The node cache: snapshots staged on the node, ready for ``thaw exec`` to restore.

Layout under ``--cache DIR`` (a hostPath, default /var/lib/thaw/cache), directories 0700, files 0600::

    <cache>/.config.json               {"budget": BYTES}, written by the agent, honoured by fetch
    <cache>/<name>/<hex>/              a complete snapshot: manifest.json + image files
    <cache>/<name>/<hex>.use           use lock: shared while a restore reads the snapshot, exclusive
                                       to evict it; its mtime is the snapshot's last use
    <cache>/<name>/<hex>.fetch         fetch lock: exclusive while the snapshot is being staged
    <cache>/<name>/.tmp-<hex>-<rand>/  a staging copy in progress (never listed, never used)
    <cache>/<name>/.trash-<hex>-<rand>/ an evicted snapshot being deleted

A snapshot directory appears only by an atomic rename of a fully copied, fully verified temporary
directory, so whatever is named ``<hex>`` is whole. Locks are ``fcntl.flock``: the kernel drops them
when a process dies, which is how a crashed fetch's leftovers are told from a running one's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, TextIO

import orjson

from thaw.contract.facts import NodeFacts, compat_key
from thaw.contract.inventory import INVENTORY_VERSION, CachedSnapshot, Inventory
from thaw.contract.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    dump_manifest,
    hex_of,
    load_manifest,
)
from thaw.snapshot.store import DigestMismatch, Progress, Store, copy_verified, fsync_dir

log = logging.getLogger("thaw.cache")

CONFIG_NAME = ".config.json"
USE_SUFFIX = ".use"
FETCH_SUFFIX = ".fetch"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DUMP_PREFIX = ".thaw-dump-"
STALE_DUMP_S = 24 * 3600
# Room kept free on the filesystem beyond the snapshot itself: a node whose disk fills up fails in
# ways far worse than a cold start.
FS_RESERVE_BYTES = 256 * 1024 * 1024
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
MEMORY_RESIDENT_FRACTION = 0.9  # of a snapshot's bytes in the page cache: its tier is "memory"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CacheError(Exception):
    """Staging or using a cached snapshot failed; the message is the cold-start reason."""


class CacheFull(CacheError):
    """No room for a snapshot within the budget or on the filesystem, even after evicting."""


class SnapshotGone(CacheError):
    """The snapshot was evicted (or never completed) before it could be used."""


@dataclass(frozen=True)
class CachedEntry:
    path: Path
    manifest: Manifest
    last_used: float  # epoch seconds

    @property
    def bytes(self) -> int:
        return self.manifest["total_bytes"]


# --- locks -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _flock(path: Path, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold a flock on ``path`` (created if missing). Yields False when ``blocking`` is off and the
    lock is taken. Re-checks after locking that ``path`` still names the locked inode: eviction
    unlinks lock files, and a lock on an unlinked inode would guard nothing."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
            try:
                fcntl.flock(fd, op)
            except BlockingIOError:
                yield False
                return
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                continue  # unlinked while we waited: lock the file that is there now
            yield True
            return
        finally:
            os.close(fd)


def _is_locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` (shared or exclusive)."""
    if not path.exists():
        return False
    with _flock(path, blocking=False) as got:
        return not got


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)


# --- layout ------------------------------------------------------------------------------------


def _ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)  # snapshots hold process memory, secrets included: root only
    return path


def snapshot_path(cache_dir: Path, manifest: Manifest) -> Path:
    """Absolute: it goes into the plan, read by another container with another working directory."""
    return Path(os.path.abspath(cache_dir)) / manifest["name"] / hex_of(manifest["id"])


def _use_lock(snapshot_dir: Path) -> Path:
    return snapshot_dir.parent / (snapshot_dir.name + USE_SUFFIX)


def _fetch_lock(snapshot_dir: Path) -> Path:
    return snapshot_dir.parent / (snapshot_dir.name + FETCH_SUFFIX)


def _complete(snapshot_dir: Path, snapshot_id: str) -> bool:
    try:
        return load_manifest(snapshot_dir / MANIFEST_NAME)["id"] == snapshot_id
    except (OSError, ManifestError):
        return False


def read_budget(cache_dir: Path) -> int | None:
    """The byte budget the agent recorded in the cache, or None (no agent yet: only the disk limits)."""
    try:
        value = orjson.loads((cache_dir / CONFIG_NAME).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    budget = value.get("budget") if isinstance(value, dict) else None
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0 else None


def write_budget(cache_dir: Path, budget: int) -> None:
    _ensure_dir(cache_dir)
    if read_budget(cache_dir) == budget:
        return
    tmp = cache_dir / f"{CONFIG_NAME}.{secrets.token_hex(4)}"
    tmp.write_bytes(orjson.dumps({"budget": budget}))
    os.replace(tmp, cache_dir / CONFIG_NAME)


def list_cached(cache_dir: Path) -> list[CachedEntry]:
    """Every complete snapshot in the cache, least recently used first."""
    out: list[CachedEntry] = []
    try:
        name_dirs = [d for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
    except FileNotFoundError:
        return out
    for name_dir in name_dirs:
        for d in name_dir.iterdir():
            if not _HEX64.match(d.name) or not d.is_dir():
                continue
            try:
                m = load_manifest(d / MANIFEST_NAME)
            except (OSError, ManifestError) as exc:
                log.warning("cache entry %s has no valid manifest (%s); it will be removed", d, exc)
                continue
            try:
                last = _use_lock(d).stat().st_mtime
            except FileNotFoundError:
                last = d.stat().st_mtime
            out.append(CachedEntry(d, m, last))
    out.sort(key=lambda e: (e.last_used, str(e.path)))
    return out


def _used_bytes(cache_dir: Path) -> int:
    return sum(e.bytes for e in list_cached(cache_dir))


# --- removal -----------------------------------------------------------------------------------


def _remove_tree(path: Path, prefix: str = TRASH_PREFIX) -> None:
    """Rename out of sight first (atomic), then delete: a crash mid-delete leaves only trash."""
    trash = path.parent / f"{prefix}{path.name}-{secrets.token_hex(4)}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def evict(snapshot_dir: Path) -> bool:
    """Remove a cached snapshot unless it is in use (its use lock cannot be taken exclusively)."""
    lock = _use_lock(snapshot_dir)
    with _flock(lock, blocking=False) as got:
        if not got:
            return False
        if snapshot_dir.exists():
            _remove_tree(snapshot_dir)
        lock.unlink(missing_ok=True)  # while held: a waiter re-checks the inode and sees it gone
        with contextlib.suppress(OSError):
            fsync_dir(snapshot_dir.parent)
        return True


def _evict_for(cache_dir: Path, need: int, budget: int | None, keep: Path | None) -> None:
    """Evict least recently used snapshots (never in use, never ``keep``) until ``need`` more bytes
    fit in the budget and on the filesystem; raise CacheFull when they cannot."""
    _ensure_dir(cache_dir)
    entries = list_cached(cache_dir)
    used = sum(e.bytes for e in entries)

    def fits() -> tuple[bool, str]:
        if budget is not None and used + need > budget:
            return False, f"budget {budget} bytes, {used} used"
        st = os.statvfs(cache_dir)
        avail = st.f_bavail * st.f_frsize
        if need + FS_RESERVE_BYTES > avail:
            return False, f"{avail} bytes free on the filesystem of {cache_dir}"
        return True, ""

    ok, why = fits()
    busy = 0
    for e in entries:
        if ok:
            return
        if keep is not None and e.path == keep:
            continue
        if evict(e.path):
            log.info(
                "evicted %s/%s (%d bytes, least recently used) to make room",
                e.manifest["name"],
                e.manifest["id"],
                e.bytes,
            )
            used -= e.bytes
        else:
            busy += 1
        ok, why = fits()
    if not ok:
        raise CacheFull(
            f"cache full: {need} bytes needed, {why}"
            + (f"; {busy} cached snapshot(s) in use could not be evicted" if busy else "")
        )


# --- staging -----------------------------------------------------------------------------------


Fill = Callable[[Path], None]  # fills a temporary snapshot directory with the manifest's files


def _install(
    cache_dir: Path, manifest: Manifest, fill: Fill, budget: int | None, on_wait: Callable[[], None] | None
) -> Path:
    final = snapshot_path(cache_dir, manifest)
    if _complete(final, manifest["id"]):
        _touch(_use_lock(final))
        return final
    name_dir = _ensure_dir(_ensure_dir(cache_dir) / manifest["name"])
    old_umask = os.umask(0o077)
    try:
        lock = _fetch_lock(final)
        with _flock(lock, blocking=False) as got:
            held = got
        if not held and on_wait:
            on_wait()
        with _flock(lock):
            if _complete(final, manifest["id"]):  # another fetch on this node staged it meanwhile
                _touch(_use_lock(final))
                return final
            # Holding the fetch lock: any temp of this snapshot is a dead fetch's leftover.
            for stale in name_dir.glob(f"{TMP_PREFIX}{final.name}-*"):
                log.info("removing %s left by an interrupted fetch", stale)
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # a directory without a valid manifest: never ours to keep
                evict(final)
            _evict_for(cache_dir, manifest["total_bytes"], budget, keep=final)
            tmp = name_dir / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
            tmp.mkdir(mode=0o700)
            try:
                try:
                    fill(tmp)
                except OSError as exc:
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise CacheFull(
                            f"cache full: {exc.strerror} while copying into {cache_dir}"
                        ) from None
                    raise
                with open(tmp / MANIFEST_NAME, "xb") as f:
                    f.write(dump_manifest(manifest))
                    f.flush()
                    os.fsync(f.fileno())
                for d in sorted({(tmp / e["path"]).parent for e in manifest["files"]}, reverse=True):
                    fsync_dir(d)
                os.rename(tmp, final)
                fsync_dir(name_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _touch(_use_lock(final))
            return final
    finally:
        os.umask(old_umask)


def stage(
    store: Store,
    manifest: Manifest,
    cache_dir: Path,
    progress: Progress | None = None,
    *,
    budget: int | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """Make ``manifest``'s snapshot present in the cache and return its directory.

    Already cached: returns at once (and marks it used). Otherwise, under the snapshot's fetch lock
    (a second fetch of the same snapshot on this node waits, then finds it staged: one copy), makes
    room (LRU eviction within ``budget``, default the agent's recorded budget), copies every file
    from the store into a temporary directory verifying size and sha256 while copying, and renames
    it into place. Raises CacheFull, DigestMismatch, thaw.snapshot.store.StoreError, or OSError; nothing
    partial is ever left under the snapshot's name.
    """
    if budget is None:
        budget = read_budget(cache_dir)

    def fill(tmp: Path) -> None:
        for e in manifest["files"]:
            src: BinaryIO = store.open_file(manifest, e["path"])
            with src:
                copy_verified(src, tmp / e["path"], e, progress)

    return _install(cache_dir, manifest, fill, budget, on_wait)


def add_local(cache_dir: Path, manifest: Manifest, images_dir: Path, budget: int | None = None) -> Path:
    """Put a snapshot taken on this node into the cache (DESIGN.md step 5: the node that took a
    snapshot is the first to hold it). Hard links when ``images_dir`` is on the cache's filesystem
    (no copy; the files were hashed for the manifest just before), else a verified copy."""
    if budget is None:
        budget = read_budget(cache_dir)

    def fill(tmp: Path) -> None:
        for e in manifest["files"]:
            src, dst = images_dir / e["path"], tmp / e["path"]
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                os.chmod(dst, 0o600)
                if os.stat(dst).st_size != e["size"]:
                    raise DigestMismatch(f"file {e['path']} changed size since it was hashed")
                continue
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                    raise
            with open(src, "rb") as f:
                copy_verified(f, dst, e)

    return _install(cache_dir, manifest, fill, budget, None)


@contextlib.contextmanager
def in_use(snapshot_dir: Path) -> Iterator[Path]:
    """Hold a snapshot for a restore: the agent never evicts it while this is held, and counts it as
    ``restoring``. Raises SnapshotGone if it was evicted (or is not a complete snapshot)."""
    if not snapshot_dir.parent.is_dir():
        raise SnapshotGone(f"snapshot {snapshot_dir} is not in the node cache")
    with _flock(_use_lock(snapshot_dir), shared=True):
        if not (snapshot_dir / MANIFEST_NAME).is_file():
            raise SnapshotGone(f"snapshot {snapshot_dir} is no longer in the node cache (evicted)")
        _touch(_use_lock(snapshot_dir))
        try:
            yield snapshot_dir
        finally:
            with contextlib.suppress(OSError):
                _touch(_use_lock(snapshot_dir))


# --- upkeep (the agent) ------------------------------------------------------------------------


def clean_stale(cache_dir: Path) -> list[str]:
    """Remove what dead processes left: temps whose fetch lock is free, trash, invalid entries, and
    lock files of snapshots that are gone. Returns what was removed."""
    removed: list[str] = []
    try:
        top = list(cache_dir.iterdir())
    except FileNotFoundError:
        return removed
    now = time.time()
    for d in top:
        # thaw exec dumps into <cache>/.thaw-dump-* (so the local copy is a hard link); one that old
        # belongs to a checkpoint that died.
        if d.name.startswith(DUMP_PREFIX) and d.is_dir() and now - d.stat().st_mtime > STALE_DUMP_S:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    name_dirs = [d for d in top if d.is_dir() and not d.name.startswith(".")]
    for name_dir in name_dirs:
        for p in sorted(name_dir.iterdir()):
            n = p.name
            if n.startswith(TRASH_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(str(p))
            elif n.startswith(TMP_PREFIX):
                hexpart = n[len(TMP_PREFIX) :].split("-", 1)[0]
                fetch_lock = name_dir / (hexpart + FETCH_SUFFIX)
                with _flock(fetch_lock, blocking=False) as got:
                    if got:  # no fetch of this snapshot runs: the temp is a dead one's
                        shutil.rmtree(p, ignore_errors=True)
                        removed.append(str(p))
                        if not (name_dir / hexpart).exists():
                            fetch_lock.unlink(missing_ok=True)  # held: waiters re-check the inode
            elif _HEX64.match(n) and p.is_dir() and not (p / MANIFEST_NAME).is_file() and evict(p):
                removed.append(str(p))  # no manifest: not something staging ever produces whole
            elif n.endswith((USE_SUFFIX, FETCH_SUFFIX)) and not (name_dir / n.rsplit(".", 1)[0]).exists():
                with _flock(p, blocking=False) as got:
                    if got:
                        p.unlink(missing_ok=True)
                        removed.append(str(p))
        with contextlib.suppress(OSError):
            name_dir.rmdir()  # only when empty
    return removed


def remove_incompatible(cache_dir: Path, facts: NodeFacts) -> list[str]:
    """Evict snapshots this node can no longer restore (its facts changed: driver or CRIU upgrade)."""
    key = compat_key(facts)
    return [
        f"{e.manifest['name']}/{e.manifest['id']}"
        for e in list_cached(cache_dir)
        if e.manifest["compat"] != key and evict(e.path)
    ]


def enforce_budget(cache_dir: Path, budget: int) -> list[str]:
    """Evict least recently used snapshots, never one in use, until the cache fits ``budget``."""
    entries = list_cached(cache_dir)
    used = sum(e.bytes for e in entries)
    evicted: list[str] = []
    for e in entries:
        if used <= budget:
            break
        if evict(e.path):
            used -= e.bytes
            evicted.append(f"{e.manifest['name']}/{e.manifest['id']}")
    return evicted


def restoring_count(cache_dir: Path) -> int:
    return sum(1 for e in list_cached(cache_dir) if _is_locked(_use_lock(e.path)))


def _fs_type(path: Path) -> str:
    """The filesystem type of ``path``'s mount (longest mount point prefix in /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def in_page_cache(entry: CachedEntry) -> bool:
    """Whether (nearly) all of a snapshot's image is in node memory: it restores at page-cache speed."""
    from thaw.snapshot.residency import resident_fraction

    files = (entry.path / f["path"] for f in entry.manifest["files"])
    return resident_fraction(files) >= MEMORY_RESIDENT_FRACTION


def inventory(cache_dir: Path, facts: NodeFacts, budget: int | None = None) -> Inventory:
    """What the node holds that it can restore (snapshots whose compat is the node's key), the bytes
    it can still take, and how many restores are running: the ``thaw.dev/cache`` annotation."""
    if budget is None:
        budget = read_budget(cache_dir)
    entries = list_cached(cache_dir) if cache_dir.is_dir() else []
    key = compat_key(facts)
    in_memory_fs = _fs_type(cache_dir) in MEMORY_FS
    used = sum(e.bytes for e in entries)
    try:
        st = os.statvfs(cache_dir)
        free = max(0, st.f_bavail * st.f_frsize - FS_RESERVE_BYTES)
    except OSError:
        free = 0
    if budget is not None:
        free = min(free, max(0, budget - used))
    snaps: list[CachedSnapshot] = [
        {
            "name": e.manifest["name"],
            "id": e.manifest["id"],
            "workload": e.manifest["workload"],
            "compat": e.manifest["compat"],
            "bytes": e.bytes,
            "tier": "memory" if in_memory_fs or in_page_cache(e) else "disk",
            "last_used": rfc3339(e.last_used),
        }
        for e in entries
        if e.manifest["compat"] == key
    ]
    inv: Inventory = {"v": INVENTORY_VERSION, "free_bytes": free, "snapshots": snaps}
    restoring = sum(1 for e in entries if _is_locked(_use_lock(e.path)))
    if restoring:
        inv["restoring"] = restoring
    return inv


# --- progress ----------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class StderrProgress:
    """Copy progress on stderr: a redrawn line on a terminal; in logs (init containers), a line every
    10% or every 5 seconds, whichever comes first, and a final line with the rate."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.start = self.last = time.monotonic()
        self.last_pct = -10

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        pct = int(100 * self.done / self.total) if self.total else 100
        if self.tty:
            if now - self.last >= 0.2 or self.done >= self.total:
                self.last = now
                self._write(f"\r{self.label}: {human_bytes(self.done)} / {human_bytes(self.total)} ({pct}%)")
        elif pct >= self.last_pct + 10 or now - self.last >= 5:
            self.last, self.last_pct = now, pct - pct % 10
            self._write(f"{self.label}: {human_bytes(self.done)} / {human_bytes(self.total)} ({pct}%)\n")

    def finish(self) -> None:
        secs = max(time.monotonic() - self.start, 1e-6)
        self._write(
            ("\n" if self.tty else "") + f"{self.label}: copied {human_bytes(self.done)} in {secs:.1f} s "
            f"({human_bytes(self.done / secs)}/s), sha256 verified\n"
        )
