"""The snapshot store: where published snapshots live, shared by every node.

``Store`` is the protocol callers use (fetch, publish); ``DirectoryStore`` implements it on a
directory (a PVC, NFS, any shared filesystem), and an OCI registry store implements the same four
methods. The protocol:

- ``describe() -> str``: where the store is, for messages.
- ``list_snapshots(namespace, name, problems) -> Sequence[Listing]``: the manifests published under
  ``(namespace, name)``, each with ``stored_at`` (epoch seconds the *store* recorded when the
  snapshot was published, None when it has none): at most MAX_LISTED of them, the newest by store
  time, each read with at most MAX_MANIFEST_BYTES and never blocking (no FIFO, symlink or slow peer
  can hang a listing). Malformed or misplaced entries are skipped with a reason appended to
  ``problems``; StoreError when the store itself cannot be read. Signatures are not checked here.
- ``open_file(namespace, manifest, path) -> BinaryIO``: one image file of a listed snapshot; a
  stream whose ``fileno()`` is a regular file lets the copy read chunks in parallel (pread).
  StoreError when it cannot be opened.
- ``download(namespace, manifest, directory, progress, deadline)``: every file of a listed snapshot
  into the empty ``directory``, each chunk checked against the manifest as it lands (what the
  cache's staging calls: a directory store copies with pread on every core, a registry pulls blobs
  in parallel with ranged, resumable requests). DigestMismatch, TimedOut, StoreError, OSError.
- ``put(namespace, manifest, snapshot_dir, progress, share=False)``: publish ``manifest`` with the
  files of ``snapshot_dir`` (the verified node cache copy that ``thaw.snapshot.ingest`` made), all
  or nothing; DigestMismatch when a file differs from the manifest. ``share``: ``snapshot_dir`` is
  trusted and never rewritten (the node cache's copy), so a store on its filesystem may take its
  files by reflink or hard link instead of writing the bytes again (still verified); a store
  elsewhere copies.

Directory layout (files 0600, directories 0700)::

    <store>/<namespace>/<name>/<hex>/manifest.json   # <hex>: the 64 hex digits of "sha256:<hex>";
    <store>/<namespace>/<name>/<hex>/<image files>   # stored_at: manifest.json's mtime
    <store>/<namespace>/<name>/.tmp-*                # a publish in progress (never listed)

Publishing is atomic: the files are copied (every chunk checked against the manifest) into a
temporary directory inside the store, fsynced, and the directory is renamed into place. With
``share`` and the source on the store's filesystem, each file is a reflink or a hard link of the
node cache's copy instead of a copy (the publish then writes the image once, not twice, on a node
whose store is a local directory), checked chunk by chunk all the same.

A store on another mount (a PVC or a second hostPath in a pod: no link crosses two mounts) is
written by the publish's own read of the dump instead (``begin_put``, a ``thaw.snapshot.transfer.Tee``
into a staging directory, then ``finish_put`` once the manifest is signed): each buffer is hashed
once and written to the cache and to the store, so neither copy is read back.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import secrets
import shutil
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, Protocol

from thaw.contract.annotations import is_dns1123_label
from thaw.contract.facts import NodeFacts
from thaw.contract.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    dump_manifest,
    hex_of,
    load_manifest,
)
from thaw.contract.safeio import fsync_dir, open_beneath, open_dir
from thaw.snapshot.transfer import (
    NO_DEADLINE,
    Deadline,
    DigestMismatch,
    Progress,
    check_files,
    copy_files,
    same_mount,
    share_files,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("thaw.store")

__all__ = [
    "DigestMismatch",
    "DirectoryStore",
    "Listed",
    "Listing",
    "Progress",
    "Store",
    "StoreError",
    "fsync_dir",
]

TMP_PREFIX = ".tmp-"
STALE_PUBLISH_S = 24 * 3600  # a publish temp dir older than this belongs to a dead publisher
MAX_LISTED = 16  # manifests a listing reads (newest by store time): bounds fetch's memory and time
MAX_SCANNED = 10_000  # entries of one name directory looked at


class StoreError(Exception):
    """The store cannot be read or written; the message says which path and why."""


class Listing(Protocol):
    """One snapshot of a listing, whatever the store: its manifest and the store's time."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def stored_at(self) -> float | None: ...


class Listed(NamedTuple):
    """DirectoryStore's Listing."""

    manifest: Manifest
    stored_at: float | None  # when the store recorded it (epoch s), not the signer's ``created``


class Store(Protocol):
    def describe(self) -> str:
        """Where the store is, for messages (a path, a registry reference)."""
        ...

    def list_snapshots(
        self, namespace: str, name: str, problems: list[str] | None = None
    ) -> Sequence[Listing]:
        """At most MAX_LISTED manifests published under (namespace, name), newest by store time,
        each read bounded; see the module docstring."""
        ...

    def open_file(self, namespace: str, manifest: Manifest, path: str) -> BinaryIO:
        """A binary stream of one image file of a listed snapshot; StoreError when unreadable."""
        ...

    def download(
        self,
        namespace: str,
        manifest: Manifest,
        directory: Path,
        progress: Progress | None = None,
        deadline: Deadline = NO_DEADLINE,
    ) -> None:
        """Every file of a listed snapshot into the empty ``directory``, verified as it lands."""
        ...

    def put(
        self,
        namespace: str,
        manifest: Manifest,
        snapshot_dir: Path,
        progress: Progress | None = None,
        *,
        share: bool = False,
    ) -> None:
        """Publish ``manifest`` with the files of ``snapshot_dir`` atomically (all or nothing, never
        half visible). DigestMismatch when a file differs from the manifest. ``share``: the source
        is trusted and never rewritten, so its files may be shared rather than copied."""
        ...


def _check_names(namespace: str, name: str) -> None:
    for what, value in (("namespace", namespace), ("snapshot name", name)):
        if not is_dns1123_label(value):
            raise StoreError(f"{what} {value!r} is not a DNS-1123 label")


def open_snapshot_file(snapshot_dir: Path, path: str) -> BinaryIO:
    """One file of a snapshot directory, opened bounded (no symlink followed on the way, regular
    file only): what ``put`` reads from the cache copy."""
    try:
        return os.fdopen(open_beneath(snapshot_dir, path), "rb")
    except OSError as exc:
        raise StoreError(f"cannot read {snapshot_dir / path}: {exc.strerror or exc}") from None


class DirectoryStore:
    """A store on a directory (PVC, NFS, hostPath in tests). Files 0600, directories 0700: snapshots
    hold the whole memory of a process, secrets included."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def snapshot_dir(self, namespace: str, name: str, snapshot_id: str) -> Path:
        return self.root / namespace / name / hex_of(snapshot_id)

    def _entries(self, name_dir: Path, problems: list[str]) -> list[tuple[float, str]]:
        """(manifest mtime, hex) of every published snapshot directory, newest first."""
        found: list[tuple[float, str]] = []
        try:
            it = os.scandir(name_dir)
        except FileNotFoundError:
            return found
        except OSError as exc:
            raise StoreError(f"cannot list {name_dir}: {exc.strerror or exc}") from None
        with it:
            for i, e in enumerate(it):
                if i >= MAX_SCANNED:
                    problems.append(f"{name_dir}: more than {MAX_SCANNED} entries; the rest were not read")
                    break
                if e.name.startswith("."):
                    continue
                d = Path(e.path)
                if not e.is_dir(follow_symlinks=False):
                    problems.append(f"{d}: not a directory (a symlink or a file): skipped")
                    continue
                try:
                    st = os.stat(d / MANIFEST_NAME, follow_symlinks=False)
                except OSError as exc:
                    problems.append(f"{d}: {exc.strerror or exc}")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    problems.append(f"{d}: {MANIFEST_NAME} is not a regular file: skipped")
                    continue
                found.append((st.st_mtime, e.name))
        found.sort(reverse=True)
        return found

    def list_snapshots(
        self, namespace: str, name: str, problems: list[str] | None = None, *, limit: int = MAX_LISTED
    ) -> list[Listed]:
        """``limit``: how many manifests to read (thaw gc reads more than fetch)."""
        problems = problems if problems is not None else []
        if not self.root.is_dir():
            raise StoreError(
                f"store {self.root} does not exist or is not a directory (is the volume mounted?)"
            )
        _check_names(namespace, name)
        name_dir = self.root / namespace / name
        entries = self._entries(name_dir, problems)
        if len(entries) > limit:
            problems.append(f"{name_dir}: {len(entries)} snapshots; only the {limit} newest were read")
        out: list[Listed] = []
        for mtime, hexname in entries[:limit]:
            d = name_dir / hexname
            try:
                dfd = open_dir(d)
                try:
                    m = load_manifest(MANIFEST_NAME, dir_fd=dfd)
                finally:
                    os.close(dfd)
            except (OSError, ManifestError) as exc:
                problems.append(f"{d}: {getattr(exc, 'strerror', None) or exc}")
                continue
            if m["name"] != name or hex_of(m["id"]) != hexname:
                problems.append(f"{d}: holds {m['name']}/{m['id']}, not what its path says")
                continue
            out.append(Listed(m, mtime))
        return out

    def open_file(self, namespace: str, manifest: Manifest, path: str) -> BinaryIO:
        d = self.snapshot_dir(namespace, manifest["name"], manifest["id"])
        try:
            return os.fdopen(open_beneath(d, path), "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {d / path}: {exc.strerror or exc}") from None

    def download(
        self,
        namespace: str,
        manifest: Manifest,
        directory: Path,
        progress: Progress | None = None,
        deadline: Deadline = NO_DEADLINE,
    ) -> None:
        copy_files(
            manifest,
            lambda e: self.open_file(namespace, manifest, e["path"]),
            directory,
            progress=progress,
            deadline=deadline,
        )

    def names(self) -> list[tuple[str, str]]:
        """(namespace, name) of every name directory (thaw gc)."""
        if not self.root.is_dir():
            raise StoreError(f"store {self.root} does not exist or is not a directory")
        return sorted(
            (ns.name, d.name)
            for ns in self.root.iterdir()
            if ns.is_dir() and not ns.is_symlink() and is_dns1123_label(ns.name)
            for d in ns.iterdir()
            if d.is_dir() and not d.is_symlink() and is_dns1123_label(d.name)
        )

    def delete(self, namespace: str, name: str, snapshot_id: str) -> None:
        """Remove a published snapshot (thaw gc): renamed out of sight first, so a reader sees all of
        it or none, then deleted."""
        _check_names(namespace, name)
        final = self.snapshot_dir(namespace, name, snapshot_id)
        trash = final.parent / f"{TMP_PREFIX}gc-{final.name[:16]}-{secrets.token_hex(8)}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot delete {final}: {exc.strerror or exc}") from None
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_stale(self, name_dir: Path) -> None:
        now = time.time()
        for p in name_dir.glob(TMP_PREFIX + "*"):
            try:
                if now - p.lstat().st_mtime > STALE_PUBLISH_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                continue

    def put(
        self,
        namespace: str,
        manifest: Manifest,
        snapshot_dir: Path,
        progress: Progress | None = None,
        *,
        share: bool = False,
    ) -> None:
        _check_names(namespace, manifest["name"])
        name_dir = self.root / namespace / manifest["name"]
        final = self.snapshot_dir(namespace, manifest["name"], manifest["id"])
        try:
            if load_manifest(final / MANIFEST_NAME)["id"] == manifest["id"]:
                return  # content-addressed: the same id is the same snapshot, already published
        except (OSError, ManifestError):
            pass
        old_umask = os.umask(0o077)
        try:
            tmp = self.begin_put(namespace, manifest["name"], hex_of(manifest["id"])[:16])
            try:
                rest = share_files(manifest, snapshot_dir, tmp, progress=progress) if share else None
                if rest is None or rest:
                    copy_files(
                        manifest,
                        lambda e: open_snapshot_file(snapshot_dir, e["path"]),
                        tmp,
                        progress=progress,
                        files=rest,
                    )
                _install(tmp, manifest, name_dir, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            os.umask(old_umask)

    def tees_from(self, namespace: str, name: str, source: Path | None) -> bool:
        """Whether a publish into the node cache at ``source`` should write this store's copy as it
        reads the dump (``begin_put``, a ``thaw.snapshot.transfer.Tee``, ``finish_put``): yes unless
        ``source`` is on the store's mount, where ``put(share=True)`` links the cache's copy (one
        write, not two). ``source`` None: a copy nothing may share (a scratch directory beside the
        dump). Makes nothing: directories not made yet are judged by their nearest parent."""

        def existing(p: Path) -> Path:
            while not p.exists() and p.parent != p:
                p = p.parent
            return p

        return source is None or not same_mount(existing(source), existing(self.root / namespace / name))

    def begin_put(self, namespace: str, name: str, tag: str = "put") -> Path:
        """A new staging directory (0700, ``.tmp-<tag>-<random>``) in the store for a publish of
        ``name`` whose files the ingest writes (``Tee``), then ``finish_put`` (or ``put``'s own);
        the caller removes it (``abandon_put``) when the publish does not finish."""
        _check_names(namespace, name)
        name_dir = self.root / namespace / name
        old_umask = os.umask(0o077)
        try:
            name_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._clean_stale(name_dir)
            staging = name_dir / f"{TMP_PREFIX}{tag}-{secrets.token_hex(8)}"
            staging.mkdir(mode=0o700)
            return staging
        finally:
            os.umask(old_umask)

    def finish_put(self, namespace: str, manifest: Manifest, staging: Path) -> None:
        """Publish ``manifest`` from ``staging`` (``begin_put``'s), whose files the ingest wrote, and
        fsynced, from the buffers it hashed: checked to be exactly the manifest's files at their
        sizes (not re-hashed: those bytes are the digests' own), then the manifest, the fsyncs and
        the rename of ``put``. ``staging`` is removed on any failure (and when the store has the
        snapshot already)."""
        _check_names(namespace, manifest["name"])
        name_dir = self.root / namespace / manifest["name"]
        if staging.parent != name_dir or not staging.name.startswith(TMP_PREFIX):
            raise StoreError(f"{staging} is not a staging directory of {name_dir}")  # left alone
        try:
            final = self.snapshot_dir(namespace, manifest["name"], manifest["id"])
            check_files(staging, manifest)
            _install(staging, manifest, name_dir, final)
        except BaseException:
            self.abandon_put(staging)
            raise

    def abandon_put(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)


def _install(tmp: Path, manifest: Manifest, name_dir: Path, final: Path) -> None:
    """The manifest into ``tmp`` (whose files are durable already), fsynced with it, and ``tmp``
    renamed to ``final``: the snapshot appears whole or not at all."""
    fd = os.open(tmp / MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(dump_manifest(manifest))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        # Another publisher of the same content won the race (or published it before): theirs is
        # identical (content-addressed).
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(name_dir)


def publish(  # noqa: PLR0917  (the signature callers had before namespaces)
    store: Store,
    name: str,
    workload: str,
    images: Path,
    signing_key: Path | Ed25519PrivateKey | None,
    facts: NodeFacts,
    *,
    namespace: str = "default",
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Ingest ``images`` (hashed as copied, into ``cache_dir`` or a temporary directory beside
    ``images``), sign the manifest, and put it in ``store``: thaw.snapshot.ingest.publish_dump.

    ``signing_key`` None publishes an unsigned snapshot (nodes refuse it unless they opt out): for
    tests and for clusters that chose not to sign; ``thaw publish`` always signs.
    """
    from thaw.snapshot.ingest import publish_dump

    return publish_dump(
        store,
        images,
        cache_dir=cache_dir,
        namespace=namespace,
        name=name,
        workload=workload,
        facts=facts,
        key=signing_key,
        progress=progress,
    ).manifest


def run_publish(args: argparse.Namespace) -> int:
    """``thaw publish --store DIR [--namespace NS] --name NAME --workload HASH --images DIR --key FILE
    [--facts FILE] [--cache DIR]``: ingest from --images (into --cache when given, which then keeps
    the node's copy), then put."""
    from thaw.errors import UsageError
    from thaw.snapshot.ingest import publish_dump
    from thaw.snapshot.nodefacts import node_facts
    from thaw.snapshot.stores import store_from_args

    try:
        store = store_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    facts = node_facts(args.facts)
    done = publish_dump(
        store,
        args.images,
        cache_dir=getattr(args, "cache", None),
        namespace=getattr(args, "namespace", None) or "default",
        name=args.name,
        workload=args.workload,
        facts=facts,
        key=args.key,
    )
    m = done.manifest
    sys.stderr.write(
        f"thaw publish: {m['name']} {m['id']} ({m['total_bytes']} bytes, {len(m['files'])} files, "
        f"compat {m['compat']}) -> {args.store} (ingest {done.ingest_s:.1f} s, put {done.put_s:.1f} s)\n"
    )
    sys.stdout.write(m["id"] + "\n")
    return 0
