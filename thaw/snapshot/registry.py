"""The snapshot store on an OCI registry: ``--store oci://HOST[:PORT]/REPOSITORY``.

Artifact layout (docs/registry.md). The snapshots of ``name`` in namespace
``ns`` live in the repository ``REPOSITORY/<ns>/<name>``: one repository per (namespace, name), so a
listing reads one name's tags only, and registry permissions can be scoped per namespace. Each
snapshot is one OCI image manifest (``application/vnd.oci.image.manifest.v1+json``)::

    artifactType  application/vnd.thaw.snapshot.v1
    config        application/vnd.thaw.snapshot.manifest.v1+json   Thaw's signed manifest.json, verbatim
    layers[]      application/vnd.thaw.snapshot.file.v1            one image file, or one chunk of it
                  annotations: dev.thaw.file.path   the file's path in the snapshot
                               dev.thaw.file.offset the chunk's first byte in that file
    annotations   org.opencontainers.image.created (Thaw's "created"), dev.thaw.snapshot.id,
                  dev.thaw.snapshot.stored (the time of the push: the store's time)

tagged ``<stored>-<hex>``: the push time in UTC (``20261201T125912.345Z``, so tags sort by store time
and a bounded listing reads the newest) and the 64 hex digits of the snapshot id. Each chunk of a file
that the signed manifest lists (``chunks``, ``chunk_bytes`` apart: 64 MiB) is its own blob, named by
that signed digest; a file without chunk digests is one blob named by its sha256; an empty file none.
So every blob a pull receives is checked against a digest Thaw signed, as it arrives; pulls run in
parallel across chunks; a chunk that did not change between two snapshots is pushed once; and a
broken connection costs at most the rest of one chunk (pulls resume with ranged requests). The
registry's OCI manifest is not signed: it keeps the blobs referenced (so the registry's garbage
collection keeps them) and says nothing Thaw relies on.

Nothing half-written is advertised: blobs first, the config, then the manifest under its tag (the
registry's own atomic step), and a pull writes into the cache's temporary directory, which the cache
renames into place only when every file verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from thaw.contract.manifest import (
    CHUNK,
    MAX_MANIFEST_BYTES,
    Manifest,
    ManifestError,
    dump_manifest,
    hex_of,
    parse_manifest,
)
from thaw.snapshot import transfer
from thaw.snapshot.oci import (
    Client,
    Credentials,
    Deadline,
    NotFound,
    RegistryError,
    RegistryRef,
    Response,
    credentials_for,
    parse_ref,
    read_auth_file,
)
from thaw.snapshot.store import Progress, fsync_dir
from thaw.snapshot.transfer import DigestMismatch

log = logging.getLogger("thaw.registry")

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.thaw.snapshot.v1"
MEDIA_CONFIG = "application/vnd.thaw.snapshot.manifest.v1+json"
MEDIA_FILE = "application/vnd.thaw.snapshot.file.v1"
ANN_PATH = "dev.thaw.file.path"
ANN_OFFSET = "dev.thaw.file.offset"
ANN_ID = "dev.thaw.snapshot.id"
ANN_STORED = "dev.thaw.snapshot.stored"
ANN_CREATED = "org.opencontainers.image.created"

PARALLEL = 4  # blobs in flight per pull or push (each a connection)
RESUMES = 4  # per blob, consecutive failed attempts without progress before giving up
MAX_LISTED = 16  # manifests a listing reads (fetch tries the newest that fit the node)
MAX_TAGS = 10_000  # read per repository; more means retention is not running (thaw gc)
MAX_ARTIFACT_BYTES = 4 * 1024 * 1024  # the OCI manifest; a 130 GB snapshot's is ~200 KB
LIST_DEADLINE_S = 60.0
PUSH_MIN_BPS = 8 * 1024 * 1024  # deadlines scale with size: slower than this is "too slow"
PULL_MIN_BPS = 8 * 1024 * 1024
BASE_DEADLINE_S = 120.0
_TAG = re.compile(r"^(\d{8}T\d{6}\.\d{3}Z)-([0-9a-f]{64})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


# --- the layout (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One blob of one file: ``size`` bytes at ``offset`` of ``path``."""

    path: str
    offset: int
    size: int
    digest: str  # sha256:<hex>


def parts_of(manifest: Manifest) -> list[Part]:
    """The blobs of a snapshot, from its signed manifest alone (the module docstring's layout)."""
    parts: list[Part] = []
    cb = manifest.get("chunk_bytes")
    for e in manifest["files"]:
        chunks = e.get("chunks")
        if chunks is not None and cb:
            parts.extend(
                Part(e["path"], i * cb, min(cb, e["size"] - i * cb), "sha256:" + c)
                for i, c in enumerate(chunks)
            )
        elif e["size"]:
            parts.append(Part(e["path"], 0, e["size"], "sha256:" + e["sha256"]))
    return parts


def tag_for(snapshot_id: str, stored_at: float) -> str:
    stamp = datetime.fromtimestamp(stored_at, UTC)
    return f"{stamp.strftime('%Y%m%dT%H%M%S')}.{stamp.microsecond // 1000:03d}Z-{hex_of(snapshot_id)}"


def parse_tag(tag: str) -> tuple[str, float] | None:
    """(snapshot id, stored_at) of a snapshot tag, None for any other tag."""
    m = _TAG.match(tag)
    if not m:
        return None
    stamp = datetime.strptime(m.group(1), "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC)
    return "sha256:" + m.group(2), stamp.timestamp()


def descriptor(
    media_type: str, digest: str, size: int, annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    d: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = annotations
    return d


def build_artifact(manifest: Manifest, config: bytes, parts: list[Part], stored_at: float) -> bytes:
    """The OCI manifest of a snapshot (the module docstring's layout)."""
    stamp = tag_for(manifest["id"], stored_at).split("-", 1)[0]
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(MEDIA_CONFIG, "sha256:" + hashlib.sha256(config).hexdigest(), len(config)),
        "layers": [
            descriptor(MEDIA_FILE, p.digest, p.size, {ANN_PATH: p.path, ANN_OFFSET: str(p.offset)})
            for p in parts
        ],
        "annotations": {ANN_CREATED: manifest["created"], ANN_ID: manifest["id"], ANN_STORED: stamp},
    }
    return orjson.dumps(doc)


class ArtifactError(ValueError):
    """An OCI manifest that is not a Thaw snapshot's, or does not match its signed manifest."""


def config_descriptor(raw: bytes) -> tuple[str, int]:
    """The config blob's (digest, size) of a snapshot's OCI manifest; ArtifactError when it is not one."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ArtifactError(f"OCI manifest is not JSON: {exc}") from None
    cfg = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(cfg, dict) or cfg.get("mediaType") != MEDIA_CONFIG:
        raise ArtifactError(f"not a Thaw snapshot (config media type is not {MEDIA_CONFIG})")
    digest, size = cfg.get("digest"), cfg.get("size")
    if not isinstance(digest, str) or not _DIGEST.match(digest) or not isinstance(size, int) or size < 0:
        raise ArtifactError("config descriptor has no sha256 digest or size")
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"config of {size} bytes is larger than {MAX_MANIFEST_BYTES}")
    return digest, size


def check_artifact(raw: bytes, manifest: Manifest) -> None:
    """Refuse an OCI manifest whose layers are not exactly the blobs of the signed ``manifest``
    (found at listing time, not halfway through a pull)."""
    doc = orjson.loads(raw)
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise ArtifactError("OCI manifest has no layers list")
    have = {(d.get("digest"), d.get("size")) for d in layers if isinstance(d, dict)}
    want = {(p.digest, p.size) for p in parts_of(manifest)}
    if have != want:
        raise ArtifactError(
            f"its layers are not the blobs its signed manifest names ({len(want - have)} missing, "
            f"{len(have - want)} extra)"
        )


# --- the store ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A snapshot as listed: its signed manifest, the store's time, and where it is."""

    manifest: Manifest
    stored_at: float
    repo: str
    tag: str
    artifact: bytes  # the OCI manifest


class _Aborted(Exception):
    """Another part failed: this one stops early (its error is not the one reported)."""


class _SafeProgress:
    """``Progress`` called from several threads (StderrProgress keeps a plain counter)."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.lock = threading.Lock()
        self.bytes = 0

    def __call__(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            if self.progress is not None:
                self.progress(n)


class RegistryStore:
    """A :class:`thaw.snapshot.store.Store` on an OCI registry (the module docstring's layout)."""

    def __init__(
        self,
        ref: RegistryRef,
        credentials: Credentials | None = None,
        *,
        ca_file: Path | None = None,
        plain_http: bool = False,
        parallel: int = PARALLEL,
    ) -> None:
        self.ref = ref
        self.client = Client(
            ref, credentials, ca_file=ca_file, plain_http=plain_http, connections=parallel + 2
        )
        self.parallel = max(1, parallel)
        self._known: dict[str, Snapshot] = {}  # by snapshot id, from listings
        self._lock = threading.Lock()

    def describe(self) -> str:
        return str(self.ref)

    def repo(self, namespace: str, name: str) -> str:
        return self.ref.repo(namespace, name)

    @staticmethod
    def _scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    # --- listing ----------------------------------------------------------------------------

    def _tags(
        self, repo: str, deadline: Deadline, problems: list[str] | None
    ) -> list[tuple[str, float, str]]:
        """(id, stored_at, tag) of every snapshot tag, newest first; [] for a repository not there."""
        try:
            tags, more = self.client.paginate(
                f"/v2/{repo}/tags/list?n=1000",
                "tags",
                scope=self._scope(repo),
                deadline=deadline,
                limit=MAX_TAGS,
            )
        except NotFound:
            return []
        if more and problems is not None:
            problems.append(f"{repo}: more than {MAX_TAGS} tags, only the first read (is thaw gc running?)")
        out = []
        for t in tags:
            parsed = parse_tag(t)
            if parsed is not None:
                out.append((parsed[0], parsed[1], t))
        out.sort(key=lambda x: (x[1], x[0]), reverse=True)
        return out

    def _get_manifest(self, repo: str, ref: str, deadline: Deadline) -> bytes:
        resp = self.client.request(
            "GET", f"/v2/{repo}/manifests/{ref}", scope=self._scope(repo), deadline=deadline,
            headers={"Accept": MEDIA_MANIFEST},
        )  # fmt: skip
        if resp.status != 200:
            raise self.client.fail(resp, f"manifest {repo}:{ref}")
        return resp.read_all(MAX_ARTIFACT_BYTES)

    def _get_blob_small(self, repo: str, digest: str, limit: int, deadline: Deadline) -> bytes:
        resp = self.client.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=self._scope(repo), deadline=deadline
        )
        if resp.status != 200:
            raise self.client.fail(resp, f"blob {digest}")
        data = resp.read_all(limit)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got != digest:
            raise DigestMismatch(f"blob {digest} of {repo}: the registry served {got} (tampered or corrupt)")
        return data

    def _read_snapshot(self, repo: str, sid: str, stored_at: float, tag: str, deadline: Deadline) -> Snapshot:
        artifact = self._get_manifest(repo, tag, deadline)
        digest, size = config_descriptor(artifact)
        manifest = parse_manifest(self._get_blob_small(repo, digest, size, deadline))
        if manifest["id"] != sid:
            raise ArtifactError(f"tag {tag} holds snapshot {manifest['id']}, not what its tag says")
        check_artifact(artifact, manifest)
        return Snapshot(manifest, stored_at, repo, tag, artifact)

    def snapshots(
        self, namespace: str, name: str, problems: list[str] | None = None, *, limit: int | None = None
    ) -> list[Snapshot]:
        """Valid snapshots of (namespace, name), newest store time first, at most ``limit`` read.
        Unreadable entries go to ``problems``; RegistryError when the registry itself fails."""
        repo = self.repo(namespace, name)
        deadline = Deadline.after(LIST_DEADLINE_S, f"listing {repo}")
        tags = self._tags(repo, deadline, problems)
        if limit is not None:
            tags = tags[:limit]
        found: list[Snapshot] = []
        with ThreadPoolExecutor(self.parallel) as pool:
            futures = [(t, pool.submit(self._read_snapshot, repo, *t, deadline)) for t in tags]
            for (_sid, _at, tag), fut in futures:
                try:
                    snap = fut.result()
                except (ArtifactError, ManifestError, DigestMismatch, NotFound) as exc:
                    if problems is not None:
                        problems.append(f"{repo}:{tag}: {exc}")
                    continue
                if snap.manifest["name"] != name:
                    if problems is not None:
                        problems.append(f"{repo}:{tag}: holds snapshot name {snap.manifest['name']!r}")
                    continue
                found.append(snap)
        with self._lock:
            for s in found:
                self._known[s.manifest["id"]] = s
        return found

    def list_snapshots(
        self, namespace: str, name: str, problems: list[str] | None = None, *, limit: int | None = MAX_LISTED
    ) -> list[Snapshot]:
        """The Store protocol's listing: newest store time first, at most ``limit`` manifests read
        (``thaw gc`` asks for more); each has ``manifest`` and ``stored_at``."""
        return self.snapshots(namespace, name, problems, limit=limit)

    def _find(self, namespace: str, manifest: Manifest) -> Snapshot:
        repo = self.repo(namespace, manifest["name"])
        with self._lock:
            known = self._known.get(manifest["id"])
        if known is not None and known.repo == repo:
            return known
        deadline = Deadline.after(LIST_DEADLINE_S, f"finding {manifest['id']} in {repo}")
        for sid, at, tag in self._tags(repo, deadline, None):
            if sid == manifest["id"]:
                snap = self._read_snapshot(repo, sid, at, tag, deadline)
                with self._lock:
                    self._known[sid] = snap
                return snap
        raise NotFound(f"registry {self.ref.host}: snapshot {manifest['id']} is not in {repo}")

    def names(self) -> list[tuple[str, str]]:
        """(namespace, name) of every snapshot repository under the store's repository (the
        ``_catalog`` API; registries that refuse it need the names given: ``thaw gc --namespace``)."""
        deadline = Deadline.after(LIST_DEADLINE_S, "listing the catalog")
        repos, _ = self.client.paginate(
            "/v2/_catalog?n=1000",
            "repositories",
            scope="registry:catalog:*",
            deadline=deadline,
            limit=100_000,
        )
        prefix = self.ref.repository + "/"
        out = []
        for r in repos:
            if r.startswith(prefix):
                rest = r[len(prefix) :].split("/")
                if len(rest) == 2:
                    out.append((rest[0], rest[1]))
        return sorted(out)

    # --- pull -------------------------------------------------------------------------------

    def _pull_part(  # noqa: PLR0917
        self,
        repo: str,
        part: Part,
        fd: int,
        deadline: Deadline,
        abort: threading.Event,
        progress: _SafeProgress,
    ) -> None:
        """Write one blob at its offset of ``fd``, hashing as it arrives; resume with a Range request
        after a broken connection or a 5xx, up to RESUMES attempts in a row without progress."""
        h = hashlib.sha256()
        got = 0
        failures = 0
        what = f"blob {part.digest[:19]}… of {part.path}"
        while True:
            if abort.is_set():
                raise _Aborted
            headers = {"Range": f"bytes={got}-{part.size - 1}"} if got else {}
            before = got
            try:
                resp = self.client.request(
                    "GET", f"/v2/{repo}/blobs/{part.digest}", scope=self._scope(repo), deadline=deadline,
                    headers=headers,
                )  # fmt: skip
                if resp.status == 200 and got:
                    log.info("%s: the registry ignored the range; reading from the start", what)
                    h, got = hashlib.sha256(), 0
                elif resp.status == 206:
                    start = _content_range_start(resp)
                    if start != got:
                        resp.close()
                        raise RegistryError(
                            f"registry {self.ref.host}: {what}: asked for byte {got}, got {start}"
                        )
                elif resp.status != 200:
                    err = self.client.fail(resp, what)
                    err.transient = resp.status >= 500 or resp.status == 429
                    raise err
                for data in self.client.stream(resp, CHUNK):
                    if got + len(data) > part.size:
                        raise DigestMismatch(f"{what}: the registry sent more than its {part.size} bytes")
                    _pwrite_all(fd, data, part.offset + got)
                    h.update(data)
                    got += len(data)
                    progress(len(data))
                    if abort.is_set():
                        resp.close()
                        raise _Aborted
                    deadline.check(self.ref.host)
                if got < part.size:
                    raise RegistryError(
                        f"registry {self.ref.host} closed the connection at byte {got} of {what}",
                        transient=True,
                    )
                break
            except RegistryError as exc:
                if not exc.transient:
                    raise
                failures = 1 if got > before else failures + 1
                if failures > RESUMES or deadline.left() <= 0:
                    raise RegistryError(
                        f"{exc}; gave up on {what} at byte {got} of {part.size} after {failures} attempts"
                    ) from exc
                log.warning("%s: %s; resuming at byte %d", what, exc, got)
                time.sleep(min(0.25 * 2**failures, 4.0))
        actual = "sha256:" + h.hexdigest()
        if actual != part.digest:
            raise DigestMismatch(
                f"{what}: the registry served {actual[:19]}…, not {part.digest[:19]}… (tampered or corrupt)"
            )

    def download(
        self,
        namespace: str,
        manifest: Manifest,
        directory: Path,
        progress: Progress | None = None,
        deadline: transfer.Deadline = transfer.NO_DEADLINE,
    ) -> None:
        """Write every file of ``manifest`` under ``directory`` (new files, 0600), each blob checked
        against its signed digest as it arrives, ``parallel`` blobs at a time, largest first, each
        resumed with a ranged request after a broken connection. Raises DigestMismatch,
        RegistryError, OSError; what it wrote is the caller's temporary directory to remove."""
        snap = self._find(namespace, manifest)
        own = Deadline.after(
            BASE_DEADLINE_S + manifest["total_bytes"] / PULL_MIN_BPS, f"the pull of {manifest['id'][:19]}…"
        )
        if deadline.at is not None:  # thaw fetch's overall deadline, when sooner
            own.at = min(own.at, deadline.at)
        safe = _SafeProgress(progress)
        fds: dict[str, int] = {}
        abort = threading.Event()
        try:
            for e in manifest["files"]:
                dst = directory / e["path"]
                dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                fds[e["path"]] = fd
                os.ftruncate(fd, e["size"])  # chunks land in any order, each at its offset

            def pull(p: Part) -> None:
                self._pull_part(snap.repo, p, fds[p.path], own, abort, safe)

            _run_all(
                pull, sorted(parts_of(manifest), key=lambda p: p.size, reverse=True), self.parallel, abort
            )
            for fd in fds.values():
                os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        for d in sorted({(directory / e["path"]).parent for e in manifest["files"]}, reverse=True):
            fsync_dir(d)

    def open_file(self, namespace: str, manifest: Manifest, path: str) -> BinaryIO:
        """One file as a stream (its chunks in order, each checked). For callers that copy one file;
        a whole snapshot goes through :meth:`download` (parallel, resumable)."""
        snap = self._find(namespace, manifest)
        if path not in {e["path"] for e in manifest["files"]}:
            raise NotFound(f"registry {self.ref.host}: snapshot {manifest['id']} has no file {path}")
        parts = [p for p in parts_of(manifest) if p.path == path]
        size = sum(p.size for p in parts)
        deadline = Deadline.after(BASE_DEADLINE_S + size / PULL_MIN_BPS, f"reading {path}")
        return _PartsReader(self, snap.repo, parts, deadline)  # type: ignore[return-value]

    # --- push -------------------------------------------------------------------------------

    def _has_blob(self, repo: str, digest: str, deadline: Deadline) -> bool:
        resp = self.client.request(
            "HEAD", f"/v2/{repo}/blobs/{digest}", scope=self._scope(repo, True), deadline=deadline
        )
        resp.close()
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self.client.fail(resp, f"checking blob {digest}")

    def _push_blob(  # noqa: PLR0917
        self,
        repo: str,
        digest: str,
        size: int,
        body: Callable[[], Iterator[bytes]],
        deadline: Deadline,
        what: str,
    ) -> str:
        """Upload one blob unless the repository has it; returns "present", "mounted" or "pushed"."""
        scope = self._scope(repo, True)
        if self._has_blob(repo, digest, deadline):
            return "present"
        # mount= without from=: registries that find the blob in another repository they serve to us
        # link it (OCI 1.1); the others answer 202 with an upload session, which we use.
        resp = self.client.request(
            "POST", f"/v2/{repo}/blobs/uploads/?mount={digest}", scope=scope, deadline=deadline,
            headers={"Content-Length": "0"},
        )  # fmt: skip
        if resp.status == 201:
            resp.close()
            return "mounted"
        if resp.status != 202:
            raise self.client.fail(resp, f"starting the upload of {what}")
        location = resp.headers.get("location")
        resp.close()
        if not location:
            raise RegistryError(f"registry {self.ref.host} started an upload with no Location")
        url = location + ("&" if "?" in location else "?") + f"digest={digest}"
        resp = self.client.request(
            "PUT", url, scope=scope, deadline=deadline, body_stream=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )  # fmt: skip
        if resp.status == 400:
            err = self.client.fail(resp, f"uploading {what}")
            if "DIGEST_INVALID" in str(err) or "digest" in str(err).lower():
                raise DigestMismatch(
                    f"{what} changed since it was hashed (the registry computed another digest)"
                )
            raise err
        if resp.status != 201:
            raise self.client.fail(resp, f"uploading {what}")
        resp.close()
        return "pushed"

    def put(
        self,
        namespace: str,
        manifest: Manifest,
        images: Path,
        progress: Progress | None = None,
        *,
        share: bool = False,
    ) -> None:
        """Push the blobs the repository lacks (HEAD first, then a mount, then an upload), then the
        config and the manifest under its tag: the tag appears only when everything it names is there.
        ``share`` changes nothing: a registry has no blocks to share with the node's disk."""
        repo = self.repo(namespace, manifest["name"])
        deadline = Deadline.after(
            BASE_DEADLINE_S + manifest["total_bytes"] / PUSH_MIN_BPS, f"the push of {repo}"
        )
        if any(sid == manifest["id"] for sid, _, _ in self._tags(repo, deadline, None)):
            return  # content-addressed: the same id is the same snapshot, already published
        parts = parts_of(manifest)  # the registry checks each upload against its signed digest
        safe = _SafeProgress(progress)
        counts = {"present": 0, "mounted": 0, "pushed": 0}
        abort = threading.Event()
        lock = threading.Lock()

        def push(p: Part) -> None:
            def body() -> Iterator[bytes]:
                yield from _read_span(images / p.path, p.offset, p.size, safe, abort)

            how = self._push_blob(repo, p.digest, p.size, body, deadline, f"file {p.path}@{p.offset}")
            with lock:
                counts[how] += 1
            if how != "pushed":
                safe(p.size)

        _run_all(push, sorted(parts, key=lambda p: p.size, reverse=True), self.parallel, abort)
        config = dump_manifest(manifest)
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        self._push_blob(repo, config_digest, len(config), lambda: iter([config]), deadline, "the manifest")
        stored_at = time.time()
        artifact = build_artifact(manifest, config, parts, stored_at)
        tag = tag_for(manifest["id"], stored_at)
        resp = self.client.request(
            "PUT", f"/v2/{repo}/manifests/{tag}", scope=self._scope(repo, True), deadline=deadline,
            body=artifact, headers={"Content-Type": MEDIA_MANIFEST},
        )  # fmt: skip
        if resp.status != 201:
            raise self.client.fail(resp, f"putting manifest {repo}:{tag}")
        resp.close()
        log.info(
            "pushed %s to %s:%s: %d blob(s) uploaded, %d already there, %d mounted",
            manifest["id"], repo, tag, counts["pushed"], counts["present"], counts["mounted"],
        )  # fmt: skip

    # --- delete (thaw gc) -------------------------------------------------------------------

    def delete(self, namespace: str, name: str, snapshot_id: str) -> None:
        """Delete a snapshot's manifest (and so its tag). Its blobs go when the registry's own garbage
        collection runs (distribution: ``registry garbage-collect``), unless another snapshot uses them."""
        repo = self.repo(namespace, name)
        deadline = Deadline.after(LIST_DEADLINE_S, f"deleting {snapshot_id} from {repo}")
        for sid, _, tag in self._tags(repo, deadline, None):
            if sid != snapshot_id:
                continue
            resp = self.client.request(
                "HEAD", f"/v2/{repo}/manifests/{tag}", scope=self._scope(repo, True), deadline=deadline,
                headers={"Accept": MEDIA_MANIFEST},
            )  # fmt: skip
            resp.close()
            digest = resp.headers.get("docker-content-digest")
            if resp.status != 200 or not digest:
                raise self.client.fail(resp, f"resolving {repo}:{tag}")
            resp = self.client.request(
                "DELETE",
                f"/v2/{repo}/manifests/{digest}",
                scope=f"repository:{repo}:delete,pull,push",
                deadline=deadline,
            )
            if resp.status == 405:
                resp.close()
                raise RegistryError(
                    f"registry {self.ref.host} does not allow deletes (405); distribution needs "
                    "storage.delete.enabled: true"
                )
            if resp.status not in (200, 202, 404):
                raise self.client.fail(resp, f"deleting {repo}:{tag}")
            resp.close()
        with self._lock:
            self._known.pop(snapshot_id, None)


# --- helpers -----------------------------------------------------------------------------------


def _content_range_start(resp: Response) -> int:
    m = re.match(r"bytes (\d+)-", resp.headers.get("content-range", ""))
    return int(m.group(1)) if m else -1


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _read_span(
    path: Path, offset: int, size: int, progress: _SafeProgress, abort: threading.Event
) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left:
            if abort.is_set():
                raise _Aborted
            data = f.read(min(CHUNK, left))
            if not data:
                raise DigestMismatch(f"file {path.name} shrank while it was being pushed")
            left -= len(data)
            progress(len(data))
            yield data


def _run_all(fn: Callable[[Part], None], parts: list[Part], parallel: int, abort: threading.Event) -> None:
    """Run ``fn`` over ``parts``, ``parallel`` at a time; on the first failure stop the others and
    raise it (not the _Aborted of the ones it stopped)."""
    with ThreadPoolExecutor(max(1, min(parallel, len(parts)))) as pool:
        futures: list[Future[None]] = [pool.submit(fn, p) for p in parts]
        wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.done() and f.exception() is not None for f in futures):
            abort.set()
            for f in futures:
                f.cancel()
    errors = [e for f in futures if not f.cancelled() and (e := f.exception()) is not None]
    real = [e for e in errors if not isinstance(e, _Aborted)]
    if real or errors:
        raise (real or errors)[0]


class _PartsReader:
    """A read-only binary stream over a file's chunks (sequential GETs, digests checked per chunk)."""

    def __init__(self, store: RegistryStore, repo: str, parts: list[Part], deadline: Deadline) -> None:
        self.store, self.repo, self.parts, self.deadline = store, repo, list(parts), deadline
        self._iter: Iterator[bytes] | None = None
        self._buf = b""

    def _chunks(self) -> Iterator[bytes]:
        client = self.store.client
        for p in self.parts:
            path = f"/v2/{self.repo}/blobs/{p.digest}"
            resp = client.request("GET", path, scope=RegistryStore._scope(self.repo), deadline=self.deadline)
            if resp.status != 200:
                raise client.fail(resp, f"blob {p.digest} of {p.path}")
            h = hashlib.sha256()
            for data in client.stream(resp, CHUNK):
                h.update(data)
                yield data
            if "sha256:" + h.hexdigest() != p.digest:
                raise DigestMismatch(f"blob {p.digest} of {p.path}: the registry served other bytes")

    def read(self, n: int = -1) -> bytes:
        if self._iter is None:
            self._iter = self._chunks()
        while n < 0 or len(self._buf) < n:
            nxt = next(self._iter, None)
            if nxt is None:
                break
            self._buf += nxt
        if n < 0:
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def close(self) -> None:
        self._iter = None

    def __enter__(self) -> _PartsReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


# --- construction ------------------------------------------------------------------------------


def open_registry(
    spec: str,
    *,
    auth_file: Path | None = None,
    ca_file: Path | None = None,
    plain_http: bool = False,
    parallel: int = PARALLEL,
) -> RegistryStore:
    """A RegistryStore for ``oci://HOST[:PORT]/REPOSITORY``; ValueError naming a bad reference, auth
    file, CA file, or a plain-HTTP registry that is not on loopback."""
    ref = parse_ref(spec)
    creds = None
    if auth_file is not None:
        creds = credentials_for(read_auth_file(auth_file), ref.host)
        if creds is None:
            log.info("--registry-auth %s has no entry for %s: anonymous", auth_file, ref.host)
    return RegistryStore(ref, creds, ca_file=ca_file, plain_http=plain_http, parallel=parallel)
