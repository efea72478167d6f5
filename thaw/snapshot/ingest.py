"""Publishing a dump: into the node cache hashed as it is copied, signed, then into the store.

``thaw sidecar`` (a pod's publisher, the only container with the signing key) and ``thaw exec`` run
by hand with ``--store`` and ``--key`` call ``publish_dump``; ``thaw publish`` too. The dump lies in
a pod-private place (the work emptyDir) that the workload can write: each file is read once, through
a descriptor opened ``O_NOFOLLOW|O_NONBLOCK`` and checked to be a regular file, and the digests
signed are those of the bytes written into the cache (what is hashed is what is stored); the store
then gets its copy from that verified cache copy, every chunk checked again on the way (a reflink or
a hard link of it when the store is a directory on the cache's mount: the image is written once,
and still checked). A directory store on another mount (a PVC, a second hostPath) is written during
the same read instead, from the buffers that were hashed (``thaw.snapshot.transfer.Tee``): the dump
is read once and neither copy is read back. A file the workload rewrites during the copy changes
nothing that was signed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from thaw.contract.facts import NodeFacts
from thaw.contract.manifest import CHUNK_BYTES, Manifest, build_manifest, image_gpu_layout, sign_manifest
from thaw.contract.safeio import fsync_dir
from thaw.contract.signing import load_private_key
from thaw.snapshot.cache import (
    CacheError,
    _complete,
    _fetch_lock,
    _finish,
    _lock,
    _touch,
    _use_lock,
    check_namespace,
    make_room,
    name_dir,
    snapshot_path,
    temp_dir,
)
from thaw.snapshot.store import DirectoryStore, Store
from thaw.snapshot.transfer import Progress, Tee, TooLarge, ingest_files


class IngestError(CacheError):
    """The dump cannot be taken into the cache; the message says why (too large, special files...)."""


@dataclass(frozen=True)
class Ingested:
    manifest: Manifest
    path: Path  # <cache>/<namespace>/<name>/<hex>
    seconds: float


@dataclass(frozen=True)
class Published:
    manifest: Manifest
    cached: Path | None  # the node cache's copy; None when publish_dump was given no cache
    ingest_s: float
    put_s: float


def _private(key: Ed25519PrivateKey | Path | None) -> Ed25519PrivateKey | None:
    return load_private_key(key) if isinstance(key, Path) else key


def ingest(
    dump: Path,
    cache_dir: Path,
    *,
    namespace: str,
    name: str,
    workload: str,
    facts: NodeFacts,
    key: Ed25519PrivateKey | Path | None,
    max_bytes: int | None = None,
    budget: int | None = None,
    progress: Progress | None = None,
    tee: Tee | None = None,
) -> Ingested:
    """Copy the dump directory ``dump`` into ``<cache>/<namespace>/<name>/<hex>/`` hashing as it
    copies, build the manifest from those digests (``facts``; the GPU layout from the copied
    ``thaw-exec.json``), sign it with ``key`` (a private key or its file; None: unsigned), write
    ``manifest.json`` and the signer's public key, and rename it into place. ``tee``: the same bytes
    into a store's staging directory too, from the same buffers (``ingest_files``).

    Room is made first (LRU eviction within ``budget``, default the agent's; never a snapshot in
    use or pinned). ``max_bytes`` caps the dump. Raises IngestError (too large, symlinks, special
    files), CacheFull, ManifestError, SigningKeyError, or OSError; nothing partial is left under a
    snapshot's name (a temporary directory that dies with its writer is removed by the agent)."""
    t0 = time.monotonic()
    check_namespace(namespace)
    private = _private(key)  # an unreadable key fails before anything is copied
    nd = name_dir(cache_dir, namespace, name)
    with temp_dir(nd) as tmp:
        try:
            entries = ingest_files(
                dump,
                tmp,
                max_bytes=max_bytes,
                progress=progress,
                before_copy=lambda total: make_room(cache_dir, total, budget),
                tee=tee,
            )
        except TooLarge as exc:
            raise IngestError(f"dump refused: {exc}") from None
        manifest = build_manifest(
            name, workload, facts, entries, gpu=image_gpu_layout(tmp), chunk_bytes=CHUNK_BYTES
        )
        if private is not None:
            manifest = sign_manifest(manifest, private)
        final = snapshot_path(cache_dir, namespace, manifest)
        with _lock(_fetch_lock(final), what=f"installing {name} {manifest['id']}"):
            if _complete(final, manifest["id"]):
                shutil.rmtree(tmp, ignore_errors=True)  # the same content is there already
            else:
                _finish(tmp, manifest, private.public_key() if private is not None else None)
                tmp.rename(final)
                fsync_dir(nd)
        _touch(_use_lock(final))
    return Ingested(manifest, final, time.monotonic() - t0)


def publish_dump(
    store: Store,
    dump: Path,
    *,
    cache_dir: Path | None,
    namespace: str,
    name: str,
    workload: str,
    facts: NodeFacts,
    key: Ed25519PrivateKey | Path | None,
    max_bytes: int | None = None,
    budget: int | None = None,
    progress: Progress | None = None,
) -> Published:
    """``ingest`` the dump into ``cache_dir`` (the node keeps that copy: the node that took a
    snapshot is the first to hold it), then ``store.put`` from it. Without ``cache_dir`` the copy
    goes into a temporary directory beside ``dump`` and is removed after the put. The dump itself is
    left for the caller to delete. A directory store the cache's copy cannot be linked into (on
    another mount; or any, for a scratch copy, which is never shared) gets its copy during the
    ingest instead (``DirectoryStore.begin_put``, a ``Tee``, ``finish_put`` once signed)."""
    scratch: Path | None = None
    if cache_dir is None:
        scratch = Path(tempfile.mkdtemp(prefix=".thaw-publish-", dir=dump.parent))
    teed: tuple[DirectoryStore, Tee] | None = None
    try:
        private = _private(key)  # an unreadable key fails before the store is touched
        if isinstance(store, DirectoryStore) and store.tees_from(namespace, name, cache_dir):
            ds = store
            teed = (ds, Tee(lambda: ds.begin_put(namespace, name)))
        done = ingest(
            dump,
            cache_dir if cache_dir is not None else scratch,  # type: ignore[arg-type]
            namespace=namespace,
            name=name,
            workload=workload,
            facts=facts,
            key=private,
            max_bytes=max_bytes,
            budget=budget,
            progress=progress,
            tee=teed[1] if teed is not None else None,
        )
        t = time.monotonic()
        staged = teed[1].directory if teed is not None else None
        if teed is not None and staged is not None and teed[1].error is None:
            teed[0].finish_put(namespace, done.manifest, staged)
        else:
            if teed is not None and staged is not None:  # the tee failed (store full, gone): put says why
                teed[0].abandon_put(staged)
            # The node cache's copy is the publisher's own and never rewritten: a store on its
            # mount may share its blocks (one write of the image, not two). A scratch copy beside
            # the dump is not shared: the workload may be able to reach it (thaw exec run by hand).
            store.put(namespace, done.manifest, done.path, share=scratch is None)
        put_s = time.monotonic() - t
        return Published(done.manifest, done.path if scratch is None else None, done.seconds, put_s)
    except BaseException:
        if teed is not None and teed[1].directory is not None:
            teed[0].abandon_put(teed[1].directory)  # nothing partial left in the store
        raise
    finally:
        if scratch is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(scratch)
