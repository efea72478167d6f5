"""The snapshot manifest (``manifest.json`` beside the image files; DESIGN.md, "Snapshot manifest").

Format 1::

    {"format": 1, "id": "sha256:<hex>", "name": ..., "workload": ..., "facts": {...}, "compat": ...,
     "files": [{"path": ..., "size": ..., "sha256": ..., "chunks": [hex, ...]}, ...],
     "chunk_bytes": 67108864, "total_bytes": ..., "created": RFC 3339,
     "gpu": {"count": N, "uuids": ["GPU-…", ...],
             "ranks": [{"pid": ..., "env": {"RANK": ..., ...}, "gpus": [0, ...]}, ...]},
     "signature": {"key_id": ..., "alg": "ed25519", "value": base64}}

``gpu`` (optional; absent for a workload without CUDA processes) is the GPU layout ``thaw exec``
recorded at the checkpoint (``thaw-exec.json``): the GPU count of the container, their UUIDs in
CUDA's order, and per CUDA process in lock order (the tensor-parallel ranks) its rank variables and
GPU ordinals.

``chunks`` (optional, present with ``chunk_bytes``): the sha256 of each consecutive ``chunk_bytes``
piece of the file, the last one shorter. ``sha256`` stays the whole file's digest (a store may name
blobs by it); the chunk digests let a node verify one large file on many cores at once (one sha256
stream runs at about 1.2 GB/s per core), and a file whose every chunk matches is the file.

The id is ``sha256:`` + sha256 of the canonical JSON (thaw.contract.canonical) of the manifest without ``id``
and ``signature`` (the *body*); the signature is over the same canonical bytes. So the id names the
content (files by digest, facts, workload, time), and a signature check also proves the id.
Pure functions except ``load_manifest`` and ``image_gpu_layout`` (bounded reads of one file); hashing
and verifying the image files is thaw.snapshot.transfer's.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NotRequired, TypedDict

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from thaw.contract.annotations import is_dns1123_label
from thaw.contract.canonical import canonical_json
from thaw.contract.facts import FactsError, NodeFacts, compat_key, compat_version, validate_facts
from thaw.contract.safeio import open_beneath, read_bounded, read_fd
from thaw.contract.signing import ALG, TrustedKeys, key_id, sign, verify

FORMAT = 1
MANIFEST_NAME = "manifest.json"
EXEC_META_NAME = "thaw-exec.json"  # thaw exec's metadata among the image files (thaw/runtime/checkpoint.py)
ID_PREFIX = "sha256:"
# CRIU writes tens to a few thousand files, and a 130 GB image has ~2,000 chunk digests (~150 kB):
# 4 MiB is plenty, and bounds what a listing of MAX_LISTED manifests can hold in memory.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_EXEC_META_BYTES = 16 * 1024 * 1024  # thaw-exec.json: pids, stdio, GPU layout
CHUNK = 4 * 1024 * 1024  # read size when hashing or copying
CHUNK_BYTES = 64 * 1024 * 1024  # digest chunk size written into new manifests
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 20, 1 << 30
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_GPU_UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

ErrorKind = Literal[
    "malformed", "id-mismatch", "unsigned", "no-trusted-keys", "untrusted-key", "bad-signature"
]


class FileEntry(TypedDict):
    path: str  # relative, POSIX separators, no '..' and no dot-files
    size: int
    sha256: str  # hex, of the whole file
    chunks: NotRequired[list[str]]  # hex, of each chunk_bytes piece (the manifest's chunk_bytes)


class Signature(TypedDict):
    key_id: str
    alg: Literal["ed25519"]
    value: str  # base64


class RankInfo(TypedDict):
    pid: int
    env: dict[str, str]  # RANK, LOCAL_RANK, WORLD_SIZE, CUDA_VISIBLE_DEVICES where set
    gpus: list[int]  # ordinals (within the container's GPUs) whose device files it had open


class GpuLayout(TypedDict):
    count: int  # GPUs the container saw
    ranks: list[RankInfo]
    uuids: NotRequired[list[str]]  # those GPUs' UUIDs in CUDA's order (a restore onto others remaps)


class Manifest(TypedDict):
    format: int
    id: str
    name: str
    workload: str
    facts: NodeFacts
    compat: str
    files: list[FileEntry]
    total_bytes: int
    created: str
    chunk_bytes: NotRequired[int]  # set when files carry chunk digests
    gpu: NotRequired[GpuLayout]
    signature: NotRequired[Signature]


class ManifestError(ValueError):
    """A manifest that is malformed or does not verify. ``kind`` is a stable code, the message is for
    people: it says which field or which key, and what was expected."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind


def hex_of(snapshot_id: str) -> str:
    """The 64 hex digits of a ``sha256:<hex>`` id (the snapshot's directory name in stores and caches)."""
    if not snapshot_id.startswith(ID_PREFIX) or not _HEX64.match(snapshot_id[len(ID_PREFIX) :]):
        raise ManifestError("malformed", f"snapshot id must be sha256:<64 hex digits>, got {snapshot_id!r}")
    return snapshot_id[len(ID_PREFIX) :]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_created(text: str) -> float:
    """Epoch seconds of an RFC 3339 time with its zone ('2026-11-28T05:40:00.123456Z'); ValueError
    otherwise."""
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return t.timestamp()


def chunk_count(size: int, chunk_bytes: int) -> int:
    """How many chunk digests a file of ``size`` bytes has (none for an empty file)."""
    return -(-size // chunk_bytes)


def body(manifest: Manifest | dict[str, Any]) -> dict[str, Any]:
    """The manifest without ``id`` and ``signature``: what the id hashes and the signature signs."""
    return {k: v for k, v in manifest.items() if k not in ("id", "signature")}


def signed_bytes(manifest: Manifest | dict[str, Any]) -> bytes:
    return canonical_json(body(manifest))


def compute_id(manifest: Manifest | dict[str, Any]) -> str:
    return ID_PREFIX + hashlib.sha256(signed_bytes(manifest)).hexdigest()


def check_file_path(path: str) -> str | None:
    """Why ``path`` cannot be a snapshot file path, or None when it can.

    Paths come from manifests that may be unsigned (opt-out) or hostile: they must never escape the
    snapshot directory, nor collide with the manifest or the cache's own dot-files.
    """
    if not path or "\x00" in path or "\\" in path:
        return "empty, or contains NUL or backslash"
    p = PurePosixPath(path)
    if p.is_absolute():
        return "absolute"
    if any(part in ("", ".", "..") or part.startswith(".") for part in path.split("/")):
        return "has an empty, '.', '..' or dot-file component"
    if path == MANIFEST_NAME:
        return f"{MANIFEST_NAME} is reserved for the manifest"
    return None


def gpu_layout_problem(value: Any) -> str | None:
    """Why ``value`` is not a GPU layout, or None when it is."""
    if not isinstance(value, dict):
        return "must be an object {count, ranks}"
    count, ranks = value.get("count"), value.get("ranks")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        return f"count must be an integer >= 0, got {count!r}"
    if not isinstance(ranks, list):
        return f"ranks must be a list, got {type(ranks).__name__}"
    uuids = value.get("uuids", [])
    if not isinstance(uuids, list) or not all(isinstance(u, str) and _GPU_UUID.match(u) for u in uuids):
        return "uuids must be GPU UUIDs (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
    if uuids and len(uuids) != count:
        return f"uuids must name all {count} GPUs, got {len(uuids)}"
    for i, r in enumerate(ranks):
        if not isinstance(r, dict):
            return f"ranks[{i}] must be an object {{pid, env, gpus}}"
        pid, env, gpus = r.get("pid"), r.get("env"), r.get("gpus")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return f"ranks[{i}].pid must be a positive integer"
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            return f"ranks[{i}].env must map names to strings"
        if not isinstance(gpus, list) or not all(
            isinstance(g, int) and not isinstance(g, bool) and 0 <= g < count for g in gpus
        ):
            return f"ranks[{i}].gpus must be GPU ordinals 0..{count - 1}"
    return None


def image_gpu_layout(images: Path) -> GpuLayout | None:
    """The GPU layout ``thaw exec`` recorded among the image files, or None (no CUDA process, or
    images not taken by thaw exec). A malformed one is refused: it would be signed into the manifest."""
    try:
        meta = orjson.loads(read_bounded(images / EXEC_META_NAME, MAX_EXEC_META_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ManifestError("malformed", f"{EXEC_META_NAME} in {images} is unreadable: {exc}") from None
    layout = meta.get("gpu") if isinstance(meta, dict) else None
    if not layout or not layout.get("ranks"):
        return None
    why = gpu_layout_problem(layout)
    if why:
        raise ManifestError("malformed", f"{EXEC_META_NAME} gpu layout: {why}")
    out: GpuLayout = {"count": layout["count"], "ranks": layout["ranks"]}
    if layout.get("uuids"):
        out["uuids"] = layout["uuids"]
    return out


def build_manifest(
    name: str,
    workload: str,
    facts: NodeFacts,
    files: list[FileEntry],
    created: str | None = None,
    *,
    gpu: GpuLayout | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Manifest:
    """An unsigned manifest with its id computed. ``chunk_bytes``: the chunk size of the files'
    ``chunks`` digests, recorded when they carry some."""
    if not is_dns1123_label(name):
        raise ManifestError("malformed", f"snapshot name {name!r} must be a DNS-1123 label")
    if not workload or not isinstance(workload, str):
        raise ManifestError("malformed", "workload hash must be a non-empty string")
    m: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "workload": workload,
        "facts": facts,
        "compat": compat_key(facts),
        "files": sorted(files, key=lambda e: e["path"]),
        "total_bytes": sum(e["size"] for e in files),
        "created": created or now_rfc3339(),
    }
    if any("chunks" in e for e in files):
        m["chunk_bytes"] = chunk_bytes
    if gpu is not None:
        m["gpu"] = gpu
    m["id"] = compute_id(m)
    validate_manifest(m)  # never build what a reader would refuse
    return m  # type: ignore[return-value]  # built field by field above


def sign_manifest(manifest: Manifest, private: Ed25519PrivateKey) -> Manifest:
    """``manifest`` with its signature."""
    signed: Manifest = {**manifest}
    signed.pop("signature", None)
    signed["id"] = compute_id(signed)
    signed["signature"] = {
        "key_id": key_id(private.public_key()),
        "alg": "ed25519",
        "value": sign(private, signed_bytes(signed)),
    }
    return signed


def _need(value: dict[str, Any], key: str, kind: type, what: str) -> Any:
    v = value.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise ManifestError("malformed", f"manifest field {key!r} must be {what}, got {v!r}"[:300])
    return v


def validate_manifest(value: Any) -> Manifest:
    """Check the shape of a manifest and that its id is the hash of its body. Does not check the
    signature (``verify_manifest``) nor the files (``check_files`` / the cache's copy)."""
    if not isinstance(value, dict):
        raise ManifestError("malformed", f"manifest must be a JSON object, got {type(value).__name__}")
    fmt = value.get("format")
    if fmt != FORMAT:
        raise ManifestError(
            "malformed", f"manifest format {fmt!r} is not supported (this Thaw reads {FORMAT})"
        )
    sid = _need(value, "id", str, "a string sha256:<hex>")
    hex_of(sid)
    name = _need(value, "name", str, "a string")
    if not is_dns1123_label(name):
        raise ManifestError("malformed", f"manifest name {name!r} is not a DNS-1123 label")
    _need(value, "workload", str, "a string")
    created = _need(value, "created", str, "an RFC 3339 time string")
    try:
        parse_created(created)
    except ValueError:
        raise ManifestError(
            "malformed", f"manifest created {created[:64]!r} is not an RFC 3339 time"
        ) from None
    chunk_bytes = value.get("chunk_bytes")
    if chunk_bytes is not None and (
        not isinstance(chunk_bytes, int)
        or isinstance(chunk_bytes, bool)
        or not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES
        or chunk_bytes & (chunk_bytes - 1)
    ):
        raise ManifestError(
            "malformed",
            f"manifest chunk_bytes must be a power of two from {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES}, "
            f"got {chunk_bytes!r}"[:300],
        )
    try:
        facts = validate_facts(value.get("facts"))
    except FactsError as exc:
        raise ManifestError("malformed", f"manifest facts: {exc}") from None
    compat = _need(value, "compat", str, "a string")
    if compat_version(facts, compat) is None:  # version 1 keys read, and match no node (facts.py)
        raise ManifestError(
            "malformed", f"manifest compat {compat!r} is not the key of its facts ({compat_key(facts)})"
        )
    files = _need(value, "files", list, "a list")
    seen: set[str] = set()
    total = 0
    for i, e in enumerate(files):
        if not isinstance(e, dict):
            raise ManifestError("malformed", f"manifest files[{i}] must be an object")
        path, size, sha = e.get("path"), e.get("size"), e.get("sha256")
        if not isinstance(path, str) or check_file_path(path):
            raise ManifestError("malformed", f"manifest files[{i}].path {path!r} is not allowed")
        if path in seen:
            raise ManifestError("malformed", f"manifest files[{i}].path {path!r} appears twice")
        seen.add(path)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError("malformed", f"manifest files[{i}].size must be an integer >= 0")
        if not isinstance(sha, str) or not _HEX64.match(sha):
            raise ManifestError("malformed", f"manifest files[{i}].sha256 must be 64 lower-case hex digits")
        if "chunks" in e:
            why = _chunks_problem(e["chunks"], size, chunk_bytes)
            if why:
                raise ManifestError("malformed", f"manifest files[{i}].chunks {why}")
        total += size
    if not files:
        raise ManifestError("malformed", "manifest lists no files")
    if value.get("total_bytes") != total:
        raise ManifestError(
            "malformed",
            f"manifest total_bytes {value.get('total_bytes')!r} is not the sum of its files ({total})",
        )
    if "gpu" in value:
        why = gpu_layout_problem(value["gpu"])
        if why:
            raise ManifestError("malformed", f"manifest gpu: {why}")
    sig = value.get("signature")
    if sig is not None and (
        not isinstance(sig, dict) or not all(isinstance(sig.get(k), str) for k in ("key_id", "alg", "value"))
    ):
        raise ManifestError("malformed", "manifest signature must be {key_id, alg, value} strings")
    computed = compute_id(value)
    if computed != sid:
        raise ManifestError(
            "id-mismatch",
            f"manifest id {sid} is not the hash of its content ({computed}): the manifest was altered",
        )
    return value  # type: ignore[return-value]  # shape checked above


def _chunks_problem(chunks: Any, size: int, chunk_bytes: int | None) -> str | None:
    if chunk_bytes is None:
        return "need the manifest's chunk_bytes"
    want = chunk_count(size, chunk_bytes)
    if not isinstance(chunks, list) or len(chunks) != want:
        return f"must list {want} digest(s) ({size} bytes in chunks of {chunk_bytes})"
    if not all(isinstance(c, str) and _HEX64.match(c) for c in chunks):
        return "must be 64 lower-case hex digits each"
    return None


def parse_manifest(raw: bytes) -> Manifest:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("malformed", f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ManifestError("malformed", f"manifest is not JSON ({exc})") from None
    return validate_manifest(value)


def load_manifest(path: Path | str, *, dir_fd: int | None = None) -> Manifest:
    """Read and validate ``path`` (or ``path`` under ``dir_fd``): a regular file of at most
    MAX_MANIFEST_BYTES, never through a symlink, never blocking on a FIFO. OSError when it cannot be
    read that way, ManifestError when it is not a valid manifest."""
    if dir_fd is None:
        return parse_manifest(read_bounded(path, MAX_MANIFEST_BYTES))
    fd = open_beneath(dir_fd, str(path), MAX_MANIFEST_BYTES)
    try:
        return parse_manifest(read_fd(fd, MAX_MANIFEST_BYTES, path))
    finally:
        os.close(fd)


def dump_manifest(manifest: Manifest) -> bytes:
    """Readable JSON for people; the id and signature never depend on this form (canonical bytes do)."""
    return orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def verify_manifest(manifest: Manifest, trusted: TrustedKeys, allow_unsigned: bool = False) -> str:
    """Check the signature; return a one-line note of what was accepted, or raise ManifestError.

    Refused: no signature, a key id not in the trust directory, an algorithm other than ed25519, or a
    signature that does not verify. ``allow_unsigned`` (the operator's explicit opt-out) accepts a
    missing signature or one by a key that is not trusted, but never a signature by a trusted key
    that fails to verify: that only happens when a signed manifest was altered.
    """
    validate_manifest(manifest)  # id == hash(body): the signature below then also proves the id
    sid = manifest["id"]
    sig = manifest.get("signature")
    if sig is None:
        if allow_unsigned:
            return f"snapshot {sid} is unsigned; accepted because unsigned snapshots are allowed"
        raise ManifestError(
            "unsigned", f"snapshot {sid} is unsigned (refused; opt out with --allow-unsigned)"
        )
    if sig["alg"] != ALG:
        raise ManifestError("bad-signature", f"snapshot {sid} signature alg {sig['alg']!r} is not {ALG}")
    public = trusted.keys.get(sig["key_id"])
    if public is None:
        if allow_unsigned:
            return (
                f"snapshot {sid} is signed by key {sig['key_id']}, which is not trusted; accepted because "
                "unsigned snapshots are allowed"
            )
        if not trusted.keys:
            detail = "; ".join(trusted.problems) or "it holds no public keys"
            raise ManifestError(
                "no-trusted-keys",
                f"snapshot {sid} is signed by key {sig['key_id']} but the trust directory "
                f"{trusted.source} has no usable keys ({detail})",
            )
        raise ManifestError(
            "untrusted-key",
            f"snapshot {sid} is signed by key {sig['key_id']}, not in the trust directory {trusted.source} "
            f"(trusted: {', '.join(sorted(trusted.keys))})",
        )
    if not verify(public, signed_bytes(manifest), sig["value"]):
        raise ManifestError(
            "bad-signature",
            f"snapshot {sid} signature by key {sig['key_id']} does not verify: the manifest was altered "
            "or signed with another key",
        )
    return f"snapshot {sid} signed by trusted key {sig['key_id']}"
