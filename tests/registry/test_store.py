"""RegistryStore against a real registry (Debian's docker-registry over TLS): the round trip, what a
second push sends, Basic and Bearer auth, TLS trust, and every failure the issue names, each with the
error a cold plan carries and nothing left behind by a failed pull but the caller's temp directory."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.registry.server import CuttingProxy, Registry
from tests.runtime.snapshots import FACTS
from thaw.contract.manifest import Manifest, build_manifest, sign_manifest
from thaw.snapshot.oci import RegistryAuthError, RegistryError, parse_ref
from thaw.snapshot.registry import RegistryStore, open_registry, parts_of
from thaw.snapshot.transfer import DigestMismatch, hash_files

CHUNK = 1 << 20  # small chunks: a few MiB of test data spans several blobs
NS = "team-a"
KEY = Ed25519PrivateKey.generate()


def snapshot(
    root: Path, files: dict[str, bytes], name: str = "demo", workload: str = "w1"
) -> tuple[Manifest, Path]:
    images = root / f"images-{name}-{len(os.listdir(root)) if root.exists() else 0}"
    for rel, data in files.items():
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(data)
    m = build_manifest(name, workload, FACTS, hash_files(images, chunk_bytes=CHUNK), chunk_bytes=CHUNK)
    return sign_manifest(m, KEY), images


def store_for(
    reg: Registry, *, host: str | None = None, password: str | None = None, ca: bool = True
) -> RegistryStore:
    auth = reg.auth_file(f"auth-{host or reg.host}.json".replace(":", "_"), hosts=[host or reg.host],
                         **({"password": password} if password else {}))  # fmt: skip
    return open_registry(reg.store(host=host), auth_file=auth, ca_file=reg.ca if ca else None)


def files_of(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


FILES = {
    "pages-1.img": os.urandom(3 * CHUNK + 12345),  # four blobs
    "core-1.img": b"core" * 1000,
    "sub/empty.img": b"",
}


def test_round_trip_chunked_and_empty_files(registry: Registry, tmp_path: Path) -> None:
    m, images = snapshot(tmp_path, FILES)
    store_for(registry).put(NS, m, images)
    reader = store_for(registry)  # a fresh client: nothing remembered from the push
    problems: list[str] = []
    listed = reader.list_snapshots(NS, "demo", problems)
    assert problems == []
    assert [s.manifest["id"] for s in listed] == [m["id"]]
    assert listed[0].stored_at is not None and abs(listed[0].stored_at - os.path.getmtime(images)) < 60
    out = tmp_path / "out"
    out.mkdir()
    got: list[int] = []
    reader.download(NS, m, out, got.append)
    assert files_of(out) == FILES
    assert sum(got) == m["total_bytes"]
    assert (out / "pages-1.img").stat().st_mode & 0o777 == 0o600
    # Per (namespace, name): another namespace sees none of it.
    assert reader.list_snapshots("team-b", "demo") == []
    assert (NS, "demo") in reader.names()


def test_second_push_sends_only_the_changed_chunks(
    registry: Registry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = {"pages-1.img": os.urandom(4 * CHUNK), "core-1.img": b"x" * 100}
    m1, images1 = snapshot(tmp_path, base, name="dedup")
    store = store_for(registry)
    store.put(NS, m1, images1)
    changed = bytearray(base["pages-1.img"])
    changed[2 * CHUNK + 5] ^= 0xFF  # one chunk of four differs
    m2, images2 = snapshot(tmp_path, {**base, "pages-1.img": bytes(changed)}, name="dedup")
    with caplog.at_level(logging.INFO, logger="thaw.registry"):
        store.put(NS, m2, images2)
    assert "1 blob(s) uploaded, 4 already there" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="thaw.registry"):
        store.put(NS, m2, images2)  # the same snapshot again: nothing at all
    assert "pushed" not in caplog.text
    ids = [s.manifest["id"] for s in store.list_snapshots(NS, "dedup")]
    assert ids == [m2["id"], m1["id"]]  # newest store time first


def test_bearer_token_auth(token_registry: Registry, tmp_path: Path) -> None:
    m, images = snapshot(tmp_path, {"a.img": os.urandom(CHUNK + 1)})
    store_for(token_registry).put(NS, m, images)
    out = tmp_path / "out"
    out.mkdir()
    store_for(token_registry).download(NS, m, out)
    assert files_of(out) == files_of(images)
    assert token_registry.tokens is not None and token_registry.tokens.issued >= 2
    with pytest.raises(RegistryAuthError, match=r"refused the credentials \(401 from its token server\)"):
        store_for(token_registry, password="wrong").list_snapshots(NS, "demo")


def test_wrong_or_missing_credentials(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryAuthError, match=r"registry 127\.0\.0\.1:\d+ refused the credentials \(401\)"):
        store_for(registry, password="wrong").list_snapshots(NS, "demo")
    anonymous = open_registry(registry.store(), ca_file=registry.ca)
    with pytest.raises(RegistryAuthError, match=r"asks for credentials \(401\) and --registry-auth has none"):
        anonymous.list_snapshots(NS, "demo")


def test_tls_is_verified(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="TLS verification failed"):
        store_for(registry, ca=False).list_snapshots(NS, "demo")


def test_plain_http_only_on_loopback() -> None:
    with pytest.raises(ValueError, match=r"allowed only for a loopback registry .* not registry\.example"):
        RegistryStore(parse_ref("oci://registry.example:5000/thaw"), plain_http=True)
    RegistryStore(parse_ref("oci://127.0.0.1:5000/thaw"), plain_http=True)
    RegistryStore(parse_ref("oci://[::1]:5000/thaw"), plain_http=True)


def test_stopped_registry(fresh_registry: Registry) -> None:
    store = store_for(fresh_registry)
    fresh_registry.stop()
    with pytest.raises(RegistryError, match=r"registry 127\.0\.0\.1:\d+ unreachable: .*refused"):
        store.list_snapshots(NS, "demo")


def test_tampered_blob(fresh_registry: Registry, tmp_path: Path) -> None:
    m, images = snapshot(tmp_path, FILES)
    store_for(fresh_registry).put(NS, m, images)
    victim = parts_of(m)[1]  # a chunk of pages-1.img
    blob = fresh_registry.blob_path(victim.digest)
    data = bytearray(blob.read_bytes())
    data[100] ^= 1
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DigestMismatch, match=r"of pages-1\.img: the registry served .*tampered or corrupt"):
        store_for(fresh_registry).download(NS, m, out)


@pytest.mark.parametrize("refuse", [False, True], ids=["cut-once-resumes", "cut-and-gone"])
def test_connection_cut_halfway(
    registry: Registry, tmp_path: Path, refuse: bool, caplog: pytest.LogCaptureFixture
) -> None:
    big = {"pages-1.img": os.urandom(6 * CHUNK)}
    m, images = snapshot(tmp_path, big, name=f"cut-{int(refuse)}")
    store_for(registry).put(NS, m, images)
    reader = store_for(registry)
    reader.list_snapshots(NS, m["name"])  # listed directly; the pull goes through the proxy
    proxy = CuttingProxy(registry.port, cut_after=2 * CHUNK + 777, refuse_after_cut=refuse)
    try:
        through = store_for(registry, host=proxy.host)
        through.list_snapshots(NS, m["name"])
        out = tmp_path / "out"
        out.mkdir()
        with caplog.at_level(logging.WARNING, logger="thaw.registry"):
            if refuse:
                with pytest.raises(RegistryError, match=r"gave up on blob .* of pages-1\.img at byte \d+"):
                    through.download(NS, m, out)
            else:
                through.download(NS, m, out)
                assert files_of(out) == big
        assert proxy.cuts == 1
        assert "resuming at byte" in caplog.text
    finally:
        proxy.close()
    shutil.rmtree(tmp_path / "out")
