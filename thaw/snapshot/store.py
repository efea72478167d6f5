"""The snapshot store: where published snapshots live, shared by every node.

``Store`` is the interface callers use (fetch, the cache, publish); ``DirectoryStore`` implements it
on a directory (a PVC, NFS, any shared filesystem) with the layout::

    <store>/<name>/<hex>/manifest.json     # <hex>: the 64 hex digits of the id "sha256:<hex>"
    <store>/<name>/<hex>/<image files>
    <store>/<name>/.tmp-*                  # a publish in progress (never listed)

An object store or an OCI registry implements the same four methods (a manifest per key or tag,
files as blobs); callers do not change. Publishing is atomic: files are written into a temporary
directory inside the store, fsynced, and the directory is renamed into place, so a reader sees all of
a snapshot or none of it.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

from thaw.contract.facts import NodeFacts
from thaw.contract.manifest import (
    CHUNK,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    ManifestError,
    build_manifest,
    dump_manifest,
    hash_files,
    hex_of,
    image_gpu_layout,
    load_manifest,
    sign_manifest,
)

log = logging.getLogger("thaw.store")

TMP_PREFIX = ".tmp-"
STALE_PUBLISH_S = 24 * 3600  # a publish temp dir older than this belongs to a dead publisher
Progress = Callable[[int], None]  # called with the number of bytes just copied


class StoreError(Exception):
    """The store cannot be read or written; the message says which path and why."""


class DigestMismatch(Exception):
    """A copied file is not what the manifest says (size or sha256)."""


class Store(Protocol):
    def describe(self) -> str:
        """Where the store is, for messages (a path, a bucket URL, a registry reference)."""
        ...

    def list_snapshots(self, name: str, problems: list[str] | None = None) -> list[Manifest]:
        """Valid manifests published under ``name``, newest first. Entries that cannot be read or are
        malformed are skipped, with a reason appended to ``problems``. Raises StoreError when the
        store itself cannot be read. Signatures are not checked here
        (thaw.contract.manifest.verify_manifest)."""
        ...

    def open_file(self, manifest: Manifest, path: str) -> BinaryIO:
        """A binary stream of one image file of a listed snapshot; StoreError when unreadable."""
        ...

    def put(self, manifest: Manifest, images: Path, progress: Progress | None = None) -> None:
        """Publish ``manifest`` with the files under ``images`` atomically (all or nothing, never half
        visible). Raises DigestMismatch when a file differs from the manifest (changed meanwhile)."""
        ...


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_verified(src: BinaryIO, dst: Path, entry: FileEntry, progress: Progress | None = None) -> None:
    """Copy ``src`` to a new file ``dst`` (0600), hashing as it goes; raise DigestMismatch unless the
    bytes are exactly ``entry`` (size and sha256). The file is fsynced before returning."""
    h = hashlib.sha256()
    size = 0
    dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            size += len(chunk)
            if size > entry["size"]:
                raise DigestMismatch(
                    f"file {entry['path']} is larger than the {entry['size']} bytes its manifest says"
                )
            h.update(chunk)
            out.write(chunk)
            if progress:
                progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if size != entry["size"]:
        raise DigestMismatch(f"file {entry['path']} has {size} bytes, its manifest says {entry['size']}")
    got = h.hexdigest()
    if got != entry["sha256"]:
        raise DigestMismatch(
            f"file {entry['path']} has sha256 {got}, its manifest says {entry['sha256']} "
            "(tampered or corrupt)"
        )


class DirectoryStore:
    """A store on a directory (PVC, NFS, hostPath in tests). Files 0600, directories 0700: snapshots
    hold the whole memory of a process, secrets included."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def snapshot_dir(self, name: str, snapshot_id: str) -> Path:
        return self.root / name / hex_of(snapshot_id)

    def list_snapshots(self, name: str, problems: list[str] | None = None) -> list[Manifest]:
        if not self.root.is_dir():
            raise StoreError(
                f"store {self.root} does not exist or is not a directory (is the volume mounted?)"
            )
        name_dir = self.root / name
        try:
            entries = sorted(p for p in name_dir.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"cannot list {name_dir}: {exc.strerror or exc}") from None
        found: list[Manifest] = []
        for d in entries:
            try:
                m = load_manifest(d / MANIFEST_NAME)
            except (OSError, ManifestError) as exc:
                if problems is not None:
                    problems.append(f"{d}: {getattr(exc, 'strerror', None) or exc}")
                continue
            if m["name"] != name or hex_of(m["id"]) != d.name:
                if problems is not None:
                    problems.append(f"{d}: holds {m['name']}/{m['id']}, not what its path says")
                continue
            found.append(m)
        found.sort(key=lambda m: (m["created"], m["id"]), reverse=True)
        return found

    def open_file(self, manifest: Manifest, path: str) -> BinaryIO:
        p = self.snapshot_dir(manifest["name"], manifest["id"]) / path
        try:
            return open(p, "rb")
        except OSError as exc:
            raise StoreError(f"cannot read {p}: {exc.strerror or exc}") from None

    def _clean_stale(self, name_dir: Path) -> None:
        now = time.time()
        for p in name_dir.glob(TMP_PREFIX + "*"):
            try:
                if now - p.stat().st_mtime > STALE_PUBLISH_S:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                continue

    def put(self, manifest: Manifest, images: Path, progress: Progress | None = None) -> None:
        name_dir = self.root / manifest["name"]
        final = self.snapshot_dir(manifest["name"], manifest["id"])
        if (final / MANIFEST_NAME).is_file():
            return  # content-addressed: the same id is the same snapshot, already published
        old_umask = os.umask(0o077)
        try:
            name_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._clean_stale(name_dir)
            tmp = name_dir / f"{TMP_PREFIX}{hex_of(manifest['id'])[:16]}-{secrets.token_hex(4)}"
            tmp.mkdir(mode=0o700)
            try:
                for e in manifest["files"]:
                    with open(images / e["path"], "rb") as src:
                        copy_verified(src, tmp / e["path"], e, progress)
                mpath = tmp / MANIFEST_NAME
                with open(mpath, "xb") as f:
                    f.write(dump_manifest(manifest))
                    f.flush()
                    os.fsync(f.fileno())
                for d in sorted({(tmp / e["path"]).parent for e in manifest["files"]}, reverse=True):
                    fsync_dir(d)
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    # Another publisher of the same content won the race: theirs is identical.
                    shutil.rmtree(tmp, ignore_errors=True)
                fsync_dir(name_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            os.umask(old_umask)


def publish(  # noqa: PLR0917  (the documented signature)
    store: Store,
    name: str,
    workload: str,
    images: Path,
    signing_key: Path | None,
    facts: NodeFacts,
    *,
    progress: Progress | None = None,
) -> Manifest:
    """Hash ``images``, build and sign the manifest, and put it in ``store`` atomically.

    ``signing_key`` None publishes an unsigned snapshot (nodes refuse it unless they opt out): for
    tests and for clusters that chose not to sign; ``thaw publish`` always signs.
    """
    from thaw.contract.signing import load_private_key

    private = load_private_key(signing_key) if signing_key is not None else None  # fail before hashing
    manifest = build_manifest(name, workload, facts, hash_files(images), gpu=image_gpu_layout(images))
    if private is not None:
        manifest = sign_manifest(manifest, private)
    store.put(manifest, images, progress)
    return manifest


def run_publish(args: argparse.Namespace) -> int:
    """``thaw publish --store DIR --name NAME --workload HASH --images DIR --key FILE [--facts FILE]``."""
    from thaw.snapshot.nodefacts import node_facts

    facts = node_facts(args.facts)
    manifest = publish(DirectoryStore(args.store), args.name, args.workload, args.images, args.key, facts)
    sys.stderr.write(
        f"thaw publish: {manifest['name']} {manifest['id']} ({manifest['total_bytes']} bytes, "
        f"{len(manifest['files'])} files, compat {manifest['compat']}) -> {args.store}\n"
    )
    sys.stdout.write(manifest["id"] + "\n")
    return 0
