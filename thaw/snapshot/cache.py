"""The node cache: snapshots staged on the node, ready for ``thaw exec`` to restore.

Layout under ``--cache DIR`` (a hostPath, default /var/lib/thaw/cache), directories 0700, files 0600::

    <cache>/.config.json                      {"budget": BYTES}, written by the agent, honoured by fetch
    <cache>/.outcomes/<pod-uid>.json          outcome copies (thaw/snapshot/outcome_copy.py)
    <cache>/<namespace>/<name>/<hex>/         a complete snapshot: manifest.json, .signer.pub (the
                                              public key its signature was verified with when it was
                                              staged; absent for an unsigned one) and the image files
    <cache>/<namespace>/<name>/<hex>.use      use lock: shared while a restore reads the snapshot
                                              (``hold_verified``, through the workload's read-only
                                              mount), exclusive for a moment to evict it; its mtime
                                              is the snapshot's last use
    <cache>/<namespace>/<name>/<hex>.fetch    fetch lock: exclusive while the snapshot is being staged
    <cache>/<namespace>/<name>/<hex>.pin-<uid> thaw fetch's pin for pod <uid>: not evicted while a pin
                                              is younger than PIN_TTL_S (the agent removes older ones)
    <cache>/<namespace>/<name>/.tmp-<rand>/   a copy in progress, flocked by its writer while it lives
    <cache>/<namespace>/<name>/.trash-<rand>/ an evicted snapshot being deleted

A workload container mounts only ``<cache>/<namespace>/<name>``, read-only: it sees its own
snapshots and can write nothing. A snapshot directory appears only by an atomic rename of a fully
copied, fully verified temporary directory, so whatever is named ``<hex>`` is whole. Locks are
``fcntl.flock``: the kernel drops them when a process dies, which is how a dead writer's leftovers
are told from a running one's. Every lock wait has a deadline (a process that can open a lock file
read-only can also hold it), and every read is bounded (thaw.contract.safeio).
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
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from thaw.contract.annotations import is_dns1123_label
from thaw.contract.facts import NodeFacts, compat_key
from thaw.contract.inventory import INVENTORY_VERSION, CachedSnapshot, Inventory
from thaw.contract.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    dump_manifest,
    hex_of,
    load_manifest,
    signed_bytes,
)
from thaw.contract.safeio import check_regular, fsync_dir, open_dir, read_bounded, write_atomic
from thaw.contract.signing import (
    MAX_KEY_FILE_BYTES,
    SigningKeyError,
    TrustedKeys,
    key_id,
    public_key_from_pem,
    public_key_pem,
    verify,
)
from thaw.snapshot.store import Store
from thaw.snapshot.transfer import (
    NO_DEADLINE,
    SIGNER_NAME,
    Deadline,
    DigestMismatch,
    Progress,
    verify_files,
)

log = logging.getLogger("thaw.cache")

CONFIG_NAME = ".config.json"
USE_SUFFIX = ".use"
FETCH_SUFFIX = ".fetch"
PIN_INFIX = ".pin-"
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
DUMP_PREFIX = ".thaw-dump-"  # dumps of thaw exec before dumps moved to the pod's work emptyDir
STALE_DUMP_S = 2 * 3600  # a dump in the cache this old belongs to a checkpoint that died
# A pin keeps a fetched snapshot until the pod's thaw exec holds it: init containers after
# thaw-fetch, and the workload's image pull, come in between.
PIN_TTL_S = 900
LOCK_POLL_S = 0.05
DEFAULT_NAMESPACE = "default"
MAX_CONFIG_BYTES = 4096
# Room kept free on the filesystem beyond the snapshot itself: a node whose disk fills up fails in
# ways far worse than a cold start.
FS_RESERVE_BYTES = 256 * 1024 * 1024
MEMORY_FS = frozenset({"tmpfs", "ramfs"})
MEMORY_RESIDENT_FRACTION = 0.9  # of a snapshot's bytes in the page cache: its tier is "memory"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_UID = re.compile(r"^[0-9a-f][0-9a-f-]{0,63}$")  # Kubernetes UIDs are UUIDs


class CacheError(Exception):
    """Staging or using a cached snapshot failed; the message is the cold-start reason."""


class CacheFull(CacheError):
    """No room for a snapshot within the budget or on the filesystem, even after evicting."""


class SnapshotGone(CacheError):
    """The snapshot was evicted (or never completed) before it could be used."""


class CacheBusy(CacheError):
    """A lock was not granted before the deadline (another process holds it)."""


class VerifyFailed(CacheError):
    """The snapshot on disk is not the one the plan names, or a file differs from its manifest."""


@dataclass(frozen=True)
class CachedEntry:
    path: Path
    namespace: str
    manifest: Manifest
    last_used: float  # epoch seconds

    @property
    def bytes(self) -> int:
        return self.manifest["total_bytes"]


# --- locks -------------------------------------------------------------------------------------


def _open_lock(path: Path, create: bool) -> int:
    """A lock file's descriptor: never through a symlink, never blocking (a FIFO fails the regular
    file check). ``create`` opens read-write and creates it; otherwise read-only (a read-only mount)."""
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CacheError(f"lock {path} is a symlink: refused") from None
        raise
    try:
        check_regular(fd, path)
    except OSError as exc:
        os.close(fd)
        raise CacheError(f"lock {path}: {exc.strerror}") from None
    return fd


def _flock_until(fd: int, op: int, deadline: Deadline, what: str) -> None:
    """flock ``fd`` (LOCK_SH or LOCK_EX), polling until ``deadline``; CacheBusy when it passes."""
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            left = deadline.left()
            if left is not None and left <= 0:
                raise CacheBusy(f"{what}: another process held the lock past the deadline") from None
            time.sleep(LOCK_POLL_S if left is None else max(0.0, min(LOCK_POLL_S, left)))


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


@contextlib.contextmanager
def _lock(
    path: Path, *, shared: bool = False, deadline: Deadline = NO_DEADLINE, what: str = ""
) -> Iterator[None]:
    """Hold a flock on ``path`` (created if missing) until the block ends; CacheBusy at the deadline.
    Re-checks after locking that ``path`` still names the locked inode: eviction unlinks lock files,
    and a lock on an unlinked inode would guard nothing."""
    while True:
        fd = _open_lock(path, create=True)
        try:
            _flock_until(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, deadline, what or str(path))
            if not _same_file(path, fd):
                continue  # unlinked while we waited: lock the file that is there now
            yield
            return
        finally:
            os.close(fd)


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """Try an exclusive flock on ``path`` without waiting; yields whether it was granted."""
    try:
        fd = _open_lock(path, create=True)
    except (OSError, CacheError):
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield _same_file(path, fd)
    finally:
        os.close(fd)


def _held(fd: int) -> bool:
    """Whether another process holds a flock (shared or exclusive) on ``fd``'s file; closes ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _is_locked(path: Path) -> bool:
    """Whether some process holds a lock on ``path`` (shared or exclusive)."""
    try:
        fd = _open_lock(path, create=False)
    except (OSError, CacheError):
        return False
    return _held(fd)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError, CacheError):
        os.close(_open_lock(path, create=True))
        os.utime(path, follow_symlinks=False)


# --- layout ------------------------------------------------------------------------------------


def _ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise CacheError(f"{path} is not a directory (a symlink?): refused")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # snapshots hold process memory, secrets included: root only
    return path


def check_namespace(namespace: str) -> str:
    """``namespace`` when it is a Kubernetes namespace name (DNS-1123 label), else CacheError."""
    if not isinstance(namespace, str) or not is_dns1123_label(namespace):
        raise CacheError(f"namespace {namespace!r} is not a DNS-1123 label (a Kubernetes namespace name)")
    return namespace


def name_dir(cache_dir: Path, namespace: str, name: str) -> Path:
    """``<cache>/<namespace>/<name>``: what a workload container of that pod mounts read-only.
    Absolute, since it goes into plans read by other containers."""
    check_namespace(namespace)
    if not is_dns1123_label(name):
        raise CacheError(f"snapshot name {name!r} is not a DNS-1123 label")
    return Path(os.path.abspath(cache_dir)) / namespace / name


def snapshot_path(cache_dir: Path, namespace: str, manifest: Manifest) -> Path:
    """``<cache>/<namespace>/<name>/<hex>``: the directory a restore plan names."""
    return name_dir(cache_dir, namespace, manifest["name"]) / hex_of(manifest["id"])


def _use_lock(snapshot_dir: Path) -> Path:
    return snapshot_dir.parent / (snapshot_dir.name + USE_SUFFIX)


def _fetch_lock(snapshot_dir: Path) -> Path:
    return snapshot_dir.parent / (snapshot_dir.name + FETCH_SUFFIX)


def _pin_path(snapshot_dir: Path, uid: str) -> Path:
    if not _UID.match(uid):
        raise CacheError(f"pod uid {uid!r} is not a Kubernetes UID")
    return snapshot_dir.parent / f"{snapshot_dir.name}{PIN_INFIX}{uid}"


def _complete(snapshot_dir: Path, snapshot_id: str) -> bool:
    try:
        return load_manifest(snapshot_dir / MANIFEST_NAME)["id"] == snapshot_id
    except (OSError, ManifestError):
        return False


def read_budget(cache_dir: Path) -> int | None:
    """The byte budget the agent recorded in the cache, or None (no agent yet: only the disk limits)."""
    try:
        value = orjson.loads(read_bounded(cache_dir / CONFIG_NAME, MAX_CONFIG_BYTES))
    except (OSError, orjson.JSONDecodeError):
        return None
    budget = value.get("budget") if isinstance(value, dict) else None
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0 else None


def write_budget(cache_dir: Path, budget: int) -> None:
    _ensure_dir(cache_dir)
    if read_budget(cache_dir) == budget:
        return
    write_atomic(cache_dir / CONFIG_NAME, orjson.dumps({"budget": budget}))


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _name_dirs(cache_dir: Path) -> Iterator[tuple[str, Path]]:
    """(namespace, ``<cache>/<namespace>/<name>``) of every name directory (real directories only)."""
    for ns in _scandir(cache_dir):
        if ns.name.startswith(".") or not ns.is_dir(follow_symlinks=False) or not is_dns1123_label(ns.name):
            continue
        for nd in _scandir(Path(ns.path)):
            if is_dns1123_label(nd.name) and nd.is_dir(follow_symlinks=False):
                yield ns.name, Path(nd.path)


def _pins(snapshot_dir: Path) -> list[tuple[Path, float]]:
    prefix = snapshot_dir.name + PIN_INFIX
    out: list[tuple[Path, float]] = []
    for e in _scandir(snapshot_dir.parent):
        if e.name.startswith(prefix):
            with contextlib.suppress(OSError):
                out.append((Path(e.path), e.stat(follow_symlinks=False).st_mtime))
    return out


def _fresh_pin(snapshot_dir: Path, now: float) -> bool:
    return any(now - mtime < PIN_TTL_S for _, mtime in _pins(snapshot_dir))


def _last_used(d: Path) -> float:
    """The newest of the use lock's mtime and the pins' (the directory's when it has neither)."""
    times = [mtime for _, mtime in _pins(d)]
    for p in (_use_lock(d), d):
        with contextlib.suppress(OSError):
            times.append(p.stat(follow_symlinks=False).st_mtime)
            break
    return max(times) if times else 0.0


def list_cached(cache_dir: Path) -> list[CachedEntry]:
    """Every complete snapshot in the cache, least recently used first (manifests read bounded)."""
    out: list[CachedEntry] = []
    for namespace, nd in _name_dirs(cache_dir):
        for e in _scandir(nd):
            if not _HEX64.match(e.name) or not e.is_dir(follow_symlinks=False):
                continue
            d = Path(e.path)
            try:
                m = load_manifest(d / MANIFEST_NAME)
            except (OSError, ManifestError) as exc:
                log.warning("cache entry %s has no valid manifest (%s); it will be removed", d, exc)
                continue
            if hex_of(m["id"]) != d.name or m["name"] != nd.name:
                log.warning(
                    "cache entry %s holds %s/%s, not what its path says; it will be removed",
                    d,
                    m["name"],
                    m["id"],
                )
                continue
            out.append(CachedEntry(d, namespace, m, _last_used(d)))
    out.sort(key=lambda e: (e.last_used, str(e.path)))
    return out


# --- removal -----------------------------------------------------------------------------------


def _to_trash(path: Path) -> Path:
    """Rename out of sight (atomic); the caller deletes the trash outside any lock."""
    trash = path.parent / f"{TRASH_PREFIX}{secrets.token_hex(8)}"
    os.rename(path, trash)
    return trash


def _delete(trash: Path) -> None:
    if trash.is_symlink() or not trash.is_dir():
        trash.unlink(missing_ok=True)
    else:
        shutil.rmtree(trash, ignore_errors=True)


def evict(snapshot_dir: Path, *, now: float | None = None) -> bool:
    """Remove a cached snapshot unless it is in use (its use lock cannot be taken at once) or pinned
    by a fetch within PIN_TTL_S. The exclusive lock is held only for the rename: deleting the files
    happens afterwards, so a restore waiting for its shared lock waits for a rename, not an rmtree."""
    now = time.time() if now is None else now
    lock = _use_lock(snapshot_dir)
    trash: Path | None = None
    with _try_lock(lock) as got:
        if not got or _fresh_pin(snapshot_dir, now):
            return False
        if os.path.lexists(snapshot_dir):
            trash = _to_trash(snapshot_dir)
        lock.unlink(missing_ok=True)  # while held: a waiter re-checks the inode and sees it gone
    with contextlib.suppress(OSError):
        fsync_dir(snapshot_dir.parent)
    if trash is not None:
        _delete(trash)
    return True


def _room_problem(cache_dir: Path, need: int, budget: int | None, used: int) -> str | None:
    if budget is not None and used + need > budget:
        return f"budget {budget} bytes, {used} used"
    st = os.statvfs(cache_dir)
    avail = st.f_bavail * st.f_frsize
    if need + FS_RESERVE_BYTES > avail:
        return f"{avail} bytes free on the filesystem of {cache_dir}"
    return None


def make_room(cache_dir: Path, need: int, budget: int | None = None, keep: Path | None = None) -> None:
    """Evict least recently used snapshots (never one in use or freshly pinned, never ``keep``) until
    ``need`` more bytes fit in the budget (default: the agent's) and on the filesystem; CacheFull
    when they cannot."""
    if budget is None:
        budget = read_budget(cache_dir)
    _ensure_dir(cache_dir)
    entries = list_cached(cache_dir)
    used = sum(e.bytes for e in entries)
    why = _room_problem(cache_dir, need, budget, used)
    busy = 0
    now = time.time()
    for e in entries:
        if why is None:
            return
        if e.path == keep:
            continue
        if evict(e.path, now=now):
            log.info(
                "evicted %s/%s/%s (%d bytes, least recently used) to make room",
                e.namespace,
                e.manifest["name"],
                e.manifest["id"],
                e.bytes,
            )
            used -= e.bytes
        else:
            busy += 1
        why = _room_problem(cache_dir, need, budget, used)
    if why is not None:
        raise CacheFull(
            f"cache full: {need} bytes needed, {why}"
            + (f"; {busy} cached snapshot(s) in use or pinned could not be evicted" if busy else "")
        )


def room_problem(cache_dir: Path, need: int, budget: int | None = None) -> str | None:
    """Why ``need`` more bytes could not fit in the cache even after evicting every snapshot that may
    be evicted (not in use, not pinned), or None. Evicts nothing: the check before a checkpoint."""
    if budget is None:
        budget = read_budget(cache_dir)
    now = time.time()
    entries = list_cached(cache_dir) if cache_dir.is_dir() else []
    kept = sum(e.bytes for e in entries if _is_locked(_use_lock(e.path)) or _fresh_pin(e.path, now))
    freeable = sum(e.bytes for e in entries) - kept
    if budget is not None and kept + need > budget:
        return (
            f"cache budget {budget} bytes cannot take {need} more ({kept} held by snapshots in use or pinned)"
        )
    try:
        st = os.statvfs(cache_dir if cache_dir.is_dir() else cache_dir.parent)
    except OSError as exc:
        return f"cannot read the free space of {cache_dir}: {exc.strerror}"
    avail = st.f_bavail * st.f_frsize + freeable
    if need + FS_RESERVE_BYTES > avail:
        return f"{avail} bytes could be free on the filesystem of {cache_dir}, {need} needed"
    return None


# --- staging -----------------------------------------------------------------------------------


Fill = Callable[[Path], None]  # fills a temporary snapshot directory with the manifest's files


@contextlib.contextmanager
def temp_dir(parent: Path) -> Iterator[Path]:
    """A new ``.tmp-<rand>`` directory (0700) under ``parent``, flocked while the block runs (so the
    agent and fetch tell it from a dead writer's) and removed when the block raises."""
    _ensure_dir(parent)
    tmp = parent / f"{TMP_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir(mode=0o700)
    fd = open_dir(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _finish(tmp: Path, manifest: Manifest, signer: Ed25519PublicKey | None) -> None:
    """Write the manifest (and the signer's key) into a filled temp directory, durably."""
    _write_new(tmp / MANIFEST_NAME, dump_manifest(manifest))
    if signer is not None and _signer_matches(manifest, signer):
        _write_new(tmp / SIGNER_NAME, public_key_pem(signer))
    fsync_dir(tmp)


def install(
    cache_dir: Path,
    namespace: str,
    manifest: Manifest,
    fill: Fill,
    *,
    signer: Ed25519PublicKey | None = None,
    budget: int | None = None,
    deadline: Deadline = NO_DEADLINE,
    on_wait: Callable[[], None] | None = None,
) -> Path:
    """Make ``manifest``'s snapshot present under ``<cache>/<namespace>/<name>/<hex>`` and return it.

    Already there: returns at once (and marks it used). Otherwise, under its fetch lock (a second
    stager of the same snapshot on this node waits, until ``deadline``, then finds it staged: one
    copy), makes room, lets ``fill`` write the files into a flocked temporary directory, writes the
    manifest and ``signer`` (the key whose signature was verified), and renames it into place.
    Nothing partial is ever left under the snapshot's name."""
    if budget is None:
        budget = read_budget(cache_dir)
    final = snapshot_path(cache_dir, namespace, manifest)
    if _complete(final, manifest["id"]):
        _touch(_use_lock(final))
        return final
    nd = _ensure_dir(_ensure_dir(_ensure_dir(cache_dir) / namespace) / manifest["name"])
    lock = _fetch_lock(final)
    if on_wait is not None and _is_locked(lock):
        on_wait()
    with _lock(lock, deadline=deadline, what=f"staging {manifest['name']} {manifest['id']}"):
        if _complete(final, manifest["id"]):  # another stager on this node finished meanwhile
            _touch(_use_lock(final))
            return final
        if os.path.lexists(final) and not evict(final):  # not a whole snapshot: never ours to keep
            raise CacheError(f"{final} exists without a valid manifest and is in use")
        for dead in remove_dead_temps(nd):  # their bytes count against the disk, not the budget
            log.info("removed %s left by an interrupted fetch or publish", dead)
        make_room(cache_dir, manifest["total_bytes"], budget, keep=final)
        with temp_dir(nd) as tmp:
            try:
                fill(tmp)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise CacheFull(f"cache full: {exc.strerror} while copying into {cache_dir}") from None
                raise
            _finish(tmp, manifest, signer)
            os.rename(tmp, final)
            fsync_dir(nd)
        _touch(_use_lock(final))
        return final


def pin(snapshot_dir: Path, uid: str, deadline: Deadline = NO_DEADLINE) -> None:
    """Pin a staged snapshot for pod ``uid`` (not evicted for PIN_TTL_S), then check, under its use
    lock, that it is still there: eviction checks pins under the exclusive use lock, so either it
    saw this pin or the snapshot is gone now (SnapshotGone: stage it again)."""
    p = _pin_path(snapshot_dir, uid)
    _touch(p)
    with _lock(_use_lock(snapshot_dir), shared=True, deadline=deadline, what=f"pinning {snapshot_dir}"):
        if not (snapshot_dir / MANIFEST_NAME).is_file():
            p.unlink(missing_ok=True)
            raise SnapshotGone(f"snapshot {snapshot_dir} was evicted while being pinned")


def unpin(snapshot_dir: Path, uid: str) -> None:
    with contextlib.suppress(OSError, CacheError):
        _pin_path(snapshot_dir, uid).unlink(missing_ok=True)


def stage(
    store: Store,
    manifest: Manifest,
    cache_dir: Path,
    progress: Progress | None = None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    signer: Ed25519PublicKey | None = None,
    budget: int | None = None,
    deadline: Deadline = NO_DEADLINE,
    on_wait: Callable[[], None] | None = None,
    pod_uid: str | None = None,
) -> Path:
    """Make ``manifest``'s snapshot present in the cache (copied from ``store``, every chunk checked
    against the manifest as it is copied) and return its directory; pinned for ``pod_uid`` when
    given. Raises CacheFull, CacheBusy, DigestMismatch, TimedOut, a StoreError, or OSError."""

    def fill(tmp: Path) -> None:
        # The store moves the bytes its own fastest way (pread on every core, parallel ranged pulls).
        store.download(namespace, manifest, tmp, progress, deadline)

    for _ in range(3):
        path = install(
            cache_dir,
            namespace,
            manifest,
            fill,
            signer=signer,
            budget=budget,
            deadline=deadline,
            on_wait=on_wait,
        )
        if pod_uid is None:
            return path
        try:
            pin(path, pod_uid, deadline)
            return path
        except SnapshotGone:
            log.info("snapshot %s was evicted right after staging; staging it again", path)
    raise SnapshotGone(f"snapshot {manifest['id']} kept being evicted while being staged")


def add_local(
    cache_dir: Path,
    manifest: Manifest,
    images_dir: Path,
    budget: int | None = None,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    signer: Ed25519PublicKey | None = None,
) -> Path:
    """Put a snapshot whose files are in ``images_dir`` into the cache (verified copy). The publisher
    ingests straight into the cache instead (thaw.snapshot.ingest); this serves callers that hold a
    manifest and its files."""
    from thaw.contract.safeio import open_beneath
    from thaw.snapshot.transfer import copy_files

    def fill(tmp: Path) -> None:
        copy_files(manifest, lambda e: os.fdopen(open_beneath(images_dir, e["path"]), "rb"), tmp)

    return install(cache_dir, namespace, manifest, fill, signer=signer, budget=budget)


# --- the restore's hold ------------------------------------------------------------------------


@contextlib.contextmanager
def hold_verified(
    snapshot_dir: Path, snapshot_id: str, deadline: float, *, workers: int | None = None
) -> Iterator[Manifest]:
    """Hold a staged snapshot for a restore and prove it is the plan's, right before CRIU reads it.

    Works through a read-only mount of ``<cache>/<namespace>/<name>``: opens the use lock
    ``O_RDONLY|O_NOFOLLOW|O_NONBLOCK`` (missing: SnapshotGone), takes it shared, polling until
    ``deadline`` (an absolute ``time.monotonic()`` time; CacheBusy after it: eviction holds it
    exclusively only for a rename), checks that the manifest (read bounded) has ``snapshot_id``,
    and re-hashes every file against it on ``workers`` threads (default: every core), chunk by chunk.
    Yields the manifest; while the block runs, the agent does not evict the snapshot and counts it
    as restoring. Every failure is a CacheError whose message is the cold-start reason:
    SnapshotGone, CacheBusy, VerifyFailed (names the file that differs)."""
    lock = _use_lock(snapshot_dir)
    try:
        fd = _open_lock(lock, create=False)
    except FileNotFoundError:
        raise SnapshotGone(f"snapshot {snapshot_dir} is no longer in the node cache (evicted)") from None
    except OSError as exc:
        raise CacheError(f"cannot open the use lock {lock}: {exc.strerror or exc}") from None
    dir_fd: int | None = None
    try:
        _flock_until(fd, fcntl.LOCK_SH, Deadline(deadline), f"waiting to use {snapshot_dir}")
        if not _same_file(lock, fd):
            raise SnapshotGone(f"snapshot {snapshot_dir} was evicted while this restore waited for it")
        try:
            dir_fd = open_dir(snapshot_dir)
        except FileNotFoundError:
            raise SnapshotGone(f"snapshot {snapshot_dir} is no longer in the node cache (evicted)") from None
        except OSError as exc:
            raise VerifyFailed(f"snapshot {snapshot_dir}: {exc.strerror or exc}") from None
        try:
            manifest = load_manifest(MANIFEST_NAME, dir_fd=dir_fd)
        except (OSError, ManifestError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise VerifyFailed(f"snapshot {snapshot_dir}: its manifest cannot be used: {why}") from None
        if manifest["id"] != snapshot_id:
            raise VerifyFailed(
                f"snapshot {snapshot_dir} holds {manifest['id']}, not {snapshot_id} named by the plan"
            )
        try:
            verify_files(dir_fd, manifest, workers=workers)
        except DigestMismatch as exc:
            raise VerifyFailed(f"snapshot {snapshot_dir} differs from its manifest: {exc}") from None
        except OSError as exc:
            raise VerifyFailed(f"snapshot {snapshot_dir}: {exc.strerror or exc}") from None
        with contextlib.suppress(OSError):
            os.utime(fd)  # last use; fails on a read-only mount, where the fetch's pin marks it
        yield manifest
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
        os.close(fd)  # releases the shared lock


# --- signatures --------------------------------------------------------------------------------


def _signer_matches(manifest: Manifest, key: Ed25519PublicKey) -> bool:
    sig = manifest.get("signature")
    return (
        sig is not None and sig["key_id"] == key_id(key) and verify(key, signed_bytes(manifest), sig["value"])
    )


def signer_of(entry: CachedEntry, trusted: TrustedKeys | None = None) -> str | None:
    """The key id that signed a cached snapshot, when its manifest's signature verifies against the
    key recorded beside it when it was staged (``.signer.pub``, written only by Thaw after checking
    the signature against the trust directory, or by the publisher that signed it), and, with
    ``trusted``, when that key is also one of those. None: unsigned, or it does not verify."""
    try:
        pem = read_bounded(entry.path / SIGNER_NAME, MAX_KEY_FILE_BYTES)
        key = public_key_from_pem(pem, str(entry.path / SIGNER_NAME))
    except (OSError, SigningKeyError):
        return None
    kid = key_id(key)
    if trusted is not None and (
        kid not in trusted.keys or public_key_pem(trusted.keys[kid]) != public_key_pem(key)
    ):
        return None
    return kid if _signer_matches(entry.manifest, key) else None


# --- upkeep (the agent) ------------------------------------------------------------------------


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that made the temporary directory ``tmp`` still holds its flock."""
    try:
        fd = open_dir(tmp)
    except OSError:
        return False
    return _held(fd)


def remove_dead_temps(nd: Path) -> list[str]:
    """Remove the temporary copies in a name directory whose writer is gone; returns them."""
    removed: list[str] = []
    for e in _scandir(nd):
        if e.name.startswith(TMP_PREFIX) and not (
            e.is_dir(follow_symlinks=False) and _writer_alive(Path(e.path))
        ):
            _delete(Path(e.path))
            removed.append(e.path)
    return removed


def _clean_name_dir(nd: Path, now: float, removed: list[str]) -> None:
    entries = _scandir(nd)
    names = {e.name for e in entries}
    for e in entries:
        n, p = e.name, Path(e.path)
        if n.startswith(TRASH_PREFIX):
            _delete(p)
            removed.append(str(p))
        elif n.startswith(TMP_PREFIX):
            if not (e.is_dir(follow_symlinks=False) and _writer_alive(p)):
                _delete(p)
                removed.append(str(p))
        elif _HEX64.match(n):
            if not e.is_dir(follow_symlinks=False):
                p.unlink(missing_ok=True)  # nothing staging makes
                removed.append(str(p))
            elif not _complete(p, "sha256:" + n) and evict(p, now=now):
                removed.append(str(p))  # no valid manifest, or another snapshot's: never whole
        elif PIN_INFIX in n:
            base = n.split(PIN_INFIX, 1)[0]
            with contextlib.suppress(OSError):
                if base not in names or now - e.stat(follow_symlinks=False).st_mtime >= PIN_TTL_S:
                    p.unlink()
                    removed.append(str(p))
        elif n.endswith((USE_SUFFIX, FETCH_SUFFIX)) and n.rsplit(".", 1)[0] not in names:
            with _try_lock(p) as got:
                if got:
                    p.unlink(missing_ok=True)  # held: waiters re-check the inode
                    removed.append(str(p))


def clean_stale(cache_dir: Path) -> list[str]:
    """Remove what dead processes left: temps whose writer is gone (their flock is free), trash,
    invalid entries, expired pins, lock files of snapshots that are gone, old dumps, and entries of
    the layout before namespaces (``<cache>/<name>/<hex>``). Returns what was removed."""
    removed: list[str] = []
    now = time.time()
    for top in _scandir(cache_dir):
        p = Path(top.path)
        if top.name.startswith(DUMP_PREFIX):
            with contextlib.suppress(OSError):
                if now - top.stat(follow_symlinks=False).st_mtime > STALE_DUMP_S:
                    _delete(p)
                    removed.append(str(p))
            continue
        if top.name.startswith(".") or not top.is_dir(follow_symlinks=False):
            continue
        for sub in _scandir(p):
            q = Path(sub.path)
            if is_dns1123_label(sub.name) and sub.is_dir(follow_symlinks=False):
                _clean_name_dir(q, now, removed)
            elif _HEX64.match(sub.name) and sub.is_dir(follow_symlinks=False) and evict(q, now=now):
                removed.append(str(q))  # the layout before namespaces: never restored any more
            elif sub.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                _delete(q)  # the layout before namespaces: its fetches are long gone
                removed.append(str(q))
            elif _HEX64.match(sub.name.split(".", 1)[0]) and not sub.is_dir(follow_symlinks=False):
                with _try_lock(q) as got:
                    if got:
                        q.unlink(missing_ok=True)
                        removed.append(str(q))
    return removed


def remove_incompatible(cache_dir: Path, facts: NodeFacts) -> list[str]:
    """Evict snapshots this node can no longer restore (its facts changed: driver or CRIU upgrade)."""
    key = compat_key(facts)
    return [
        f"{e.namespace}/{e.manifest['name']}/{e.manifest['id']}"
        for e in list_cached(cache_dir)
        if e.manifest["compat"] != key and evict(e.path)
    ]


def enforce_budget(cache_dir: Path, budget: int) -> list[str]:
    """Evict least recently used snapshots, never one in use or pinned, until the cache fits ``budget``."""
    entries = list_cached(cache_dir)
    used = sum(e.bytes for e in entries)
    evicted: list[str] = []
    for e in entries:
        if used <= budget:
            break
        if evict(e.path):
            used -= e.bytes
            evicted.append(f"{e.namespace}/{e.manifest['name']}/{e.manifest['id']}")
    return evicted


def mark_in_use(cache_dir: Path) -> int:
    """Touch the use lock of every snapshot a restore holds now (their last use is now: a restore
    works through a read-only mount and cannot), and return how many there are."""
    held = 0
    for e in list_cached(cache_dir):
        if _is_locked(_use_lock(e.path)):
            held += 1
            _touch(_use_lock(e.path))
    return held


def _fs_type(path: Path) -> str:
    """The filesystem type of ``path``'s mount (longest mount point prefix in /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        lines = read_bounded("/proc/self/mounts", 16 * 1024 * 1024).decode(errors="replace").splitlines()
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


def inventory(
    cache_dir: Path, facts: NodeFacts, budget: int | None = None, *, trusted: TrustedKeys | None = None
) -> Inventory:
    """What the node holds that it can restore, the bytes it can still take, and how many restores
    are running: the ``thaw.dev/cache`` annotation. Listed: snapshots whose compat is the node's key
    and whose signature verifies (``signer_of``); an unsigned or altered manifest is never
    advertised, whatever its files."""
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
    snaps: list[CachedSnapshot] = []
    for e in entries:
        if e.manifest["compat"] != key:
            continue
        if signer_of(e, trusted) is None:
            log.info(
                "not advertising %s: its manifest's signature does not verify (or it is unsigned)", e.path
            )
            continue
        snaps.append(
            {
                "name": e.manifest["name"],
                "id": e.manifest["id"],
                "workload": e.manifest["workload"],
                "compat": e.manifest["compat"],
                "bytes": e.bytes,
                "tier": "memory" if in_memory_fs or in_page_cache(e) else "disk",
                "last_used": rfc3339(e.last_used),
            }
        )
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
