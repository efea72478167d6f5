"""Manifest, signing, trust directory, restore plan and node facts: the pure parts and the key CLI."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.runtime.snapshots import FACTS, facts
from thaw.contract.canonical import canonical_json
from thaw.contract.facts import FactsError, compat_key, read_facts_file, write_facts_file
from thaw.contract.manifest import (
    ManifestError,
    build_manifest,
    check_file_path,
    compute_id,
    image_gpu_layout,
    parse_manifest,
    sign_manifest,
    validate_manifest,
    verify_manifest,
)
from thaw.contract.plan import cold_plan, read_plan, restore_plan, write_plan
from thaw.contract.signing import key_id, load_private_key, load_trusted_keys
from thaw.dev.sandbox import thaw_cli
from thaw.snapshot.nodefacts import (
    detect_criu,
    facts_difference,
    gfd_product,
    load_facts_file,
    node_facts,
    node_gpu_count,
    parse_criu_version,
    parse_proc_version,
    pci_gpu_count,
)
from thaw.snapshot.transfer import hash_files


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    out = thaw_cli("keys", "generate", "--out", tmp_path / "keys")
    assert out.returncode == 0, out.stderr
    return tmp_path / "keys"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    (d / "sub").mkdir(parents=True)
    (d / "pages-1.img").write_bytes(os.urandom(100_000))
    (d / "core-1.img").write_bytes(b"core")
    (d / "sub" / "x.img").write_bytes(b"")
    return d


def signed(images: Path, keydir: Path, **kw: Any) -> Any:
    m = build_manifest("demo", "w1", kw.get("facts", FACTS), hash_files(images))
    return sign_manifest(m, load_private_key(keydir / "signing.key"))


def test_keys_generate_writes_a_private_key_only_root_can_read_and_refuses_to_overwrite(keydir: Path) -> None:
    assert stat.S_IMODE((keydir / "signing.key").stat().st_mode) == 0o600
    kid = key_id(load_private_key(keydir / "signing.key").public_key())
    assert list(load_trusted_keys(keydir).keys) == [kid]  # the .pub; the .key is reported, not trusted
    again = thaw_cli("keys", "generate", "--out", keydir)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr


def test_manifest_shape_and_content_addressed_id(images: Path, keydir: Path) -> None:
    m = signed(images, keydir)
    assert m["format"] == 1
    assert [e["path"] for e in m["files"]] == ["core-1.img", "pages-1.img", "sub/x.img"]
    assert m["total_bytes"] == 100_004
    assert m["compat"] == compat_key(FACTS)
    assert m["id"] == compute_id(m) and m["id"].startswith("sha256:")
    assert m["signature"]["alg"] == "ed25519"
    # The id is the hash of the canonical body: same body, same id; any change, another id.
    assert parse_manifest(orjson.dumps(m, option=orjson.OPT_INDENT_2))["id"] == m["id"]
    other = build_manifest("demo", "w2", FACTS, m["files"], created=m["created"])
    assert other["id"] != m["id"]


def test_verify_accepts_a_trusted_signature(images: Path, keydir: Path) -> None:
    note = verify_manifest(signed(images, keydir), load_trusted_keys(keydir))
    assert "signed by trusted key" in note


def test_altered_manifest_is_refused_by_id_then_by_signature(images: Path, keydir: Path) -> None:
    m = signed(images, keydir)
    trusted = load_trusted_keys(keydir)
    m["workload"] = "evil"
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, trusted)
    assert exc.value.kind == "id-mismatch"
    m["id"] = compute_id(m)  # an attacker who also recomputes the id still lacks the private key
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, trusted)
    assert exc.value.kind == "bad-signature"
    # ... and the opt-out does not excuse a trusted key's signature that fails.
    with pytest.raises(ManifestError):
        verify_manifest(m, trusted, allow_unsigned=True)


def test_unsigned_refused_unless_opted_out(images: Path, keydir: Path) -> None:
    m = build_manifest("demo", "w1", FACTS, hash_files(images))
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, load_trusted_keys(keydir))
    assert exc.value.kind == "unsigned" and "--allow-unsigned" in str(exc.value)
    assert "unsigned" in verify_manifest(m, load_trusted_keys(keydir), allow_unsigned=True)


def test_untrusted_key_names_the_key_and_the_trusted_ones(images: Path, keydir: Path, tmp_path: Path) -> None:
    stranger = Ed25519PrivateKey.generate()
    m = sign_manifest(build_manifest("demo", "w1", FACTS, hash_files(images)), stranger)
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, load_trusted_keys(keydir))
    assert exc.value.kind == "untrusted-key"
    assert key_id(stranger.public_key()) in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, load_trusted_keys(empty))
    assert exc.value.kind == "no-trusted-keys"


def test_garbled_signature_value(images: Path, keydir: Path) -> None:
    m = signed(images, keydir)
    m["signature"]["value"] = base64.b64encode(b"\0" * 64).decode()
    with pytest.raises(ManifestError) as exc:
        verify_manifest(m, load_trusted_keys(keydir))
    assert exc.value.kind == "bad-signature"
    m["signature"]["value"] = "not base64!"
    with pytest.raises(ManifestError):
        verify_manifest(m, load_trusted_keys(keydir))


def test_trust_directory_like_a_mounted_secret(keydir: Path, tmp_path: Path) -> None:
    """Secret volumes hold ..data symlink machinery and may hold other things: skip dot-files,
    report junk, keep the good keys."""
    trust = tmp_path / "trust"
    data = trust / "..2026_11_28_00_00_00.123"
    data.mkdir(parents=True)
    (data / "signing.pub").write_bytes((keydir / "signing.pub").read_bytes())
    (trust / "..data").symlink_to(data.name)
    (trust / "signing.pub").symlink_to("..data/signing.pub")
    (trust / "README").write_text("not a key")
    t = load_trusted_keys(trust)
    assert len(t.keys) == 1
    assert any("README" in p for p in t.problems)
    missing = load_trusted_keys(tmp_path / "nope")
    assert not missing.keys and "cannot read trust directory" in missing.problems[0]


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "/abs", "a/../b", ".hidden", "a//b", "manifest.json", "a\\b", ""]
)
def test_file_paths_that_could_escape_or_collide_are_refused(path: str) -> None:
    assert check_file_path(path) is not None


def test_malformed_manifests_name_the_field(images: Path, keydir: Path) -> None:
    m = signed(images, keydir)
    cases: list[tuple[str, Any, str]] = [
        ("format", 2, "format"),
        ("total_bytes", 1, "total_bytes"),
        ("compat", "0000000000000000", "compat"),
        ("name", "Not_DNS", "name"),
        ("files", [], "no files"),
        ("files", [{"path": "../x", "size": 1, "sha256": "0" * 64}], "files[0].path"),
    ]
    for key, value, needle in cases:
        bad = {**m, key: value}
        with pytest.raises(ManifestError) as exc:
            validate_manifest(bad)
        assert needle in str(exc.value), (key, str(exc.value))
    with pytest.raises(ManifestError, match="not JSON"):
        parse_manifest(b"{")


# --- GPU layout (issue 6: the manifest records the ranks) ----------------------------------------

UUIDS = ["GPU-e127b204-c9b7-2af2-5b9f-09825cd678f2", "GPU-ad9af744-de18-081b-7eb9-396651549436"]
LAYOUT: dict[str, Any] = {
    "count": 2,
    "uuids": UUIDS,
    "ranks": [
        {"pid": 4128, "env": {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, "gpus": [0, 1]},
        {"pid": 4129, "env": {"LOCAL_RANK": "1", "RANK": "1", "WORLD_SIZE": "2"}, "gpus": [0, 1]},
    ],
}  # as thaw exec recorded it on 2x H200 (bench/gpu/results/h200x2-tp2-probes-2026-11-28.json)


def test_published_manifest_records_the_ranks_and_its_id_covers_them(
    images: Path, keydir: Path, tmp_path: Path
) -> None:
    from thaw.snapshot.store import DirectoryStore, publish

    (images / "thaw-exec.json").write_bytes(orjson.dumps({"format": 1, "gpu": LAYOUT, "pids": [4096]}))
    m = publish(DirectoryStore(tmp_path / "store"), "demo", "w1", images, keydir / "signing.key", FACTS)
    assert m["gpu"] == LAYOUT
    verify_manifest(m, load_trusted_keys(keydir))
    one_rank = {**m, "gpu": {"count": 1, "ranks": [{**LAYOUT["ranks"][0], "gpus": [0]}]}}
    with pytest.raises(ManifestError) as exc:
        validate_manifest(one_rank)
    assert exc.value.kind == "id-mismatch"


@pytest.mark.parametrize(
    ("meta", "want"),
    [
        (None, None),  # not taken by thaw exec
        ({"format": 1, "pids": [4096]}, None),  # an older thaw-exec.json
        ({"format": 1, "gpu": {"count": 0, "ranks": []}}, None),  # no CUDA process
        ({"format": 1, "gpu": LAYOUT}, LAYOUT),
    ],
)
def test_image_gpu_layout(images: Path, meta: Any, want: Any) -> None:
    if meta is not None:
        (images / "thaw-exec.json").write_bytes(orjson.dumps(meta))
    assert image_gpu_layout(images) == want
    assert ("gpu" in build_manifest("demo", "w1", FACTS, hash_files(images), gpu=want)) is (want is not None)


@pytest.mark.parametrize(
    ("gpu", "needle"),
    [
        ([], "must be an object"),
        ({"count": -1, "ranks": []}, "count must be an integer >= 0"),
        ({"count": True, "ranks": []}, "count must be an integer >= 0"),
        ({"count": 2, "ranks": {}}, "ranks must be a list"),
        ({"count": 1, "ranks": [], "uuids": ["GPU-1"]}, "uuids must be GPU UUIDs"),
        ({"count": 2, "ranks": [], "uuids": UUIDS[:1]}, "uuids must name all 2 GPUs, got 1"),
        ({"count": 2, "ranks": [7]}, "ranks[0] must be an object"),
        (
            {"count": 2, "ranks": [{"pid": 0, "env": {}, "gpus": []}]},
            "ranks[0].pid must be a positive integer",
        ),
        ({"count": 2, "ranks": [{"pid": 5, "env": {"RANK": 0}, "gpus": []}]}, "ranks[0].env must map"),
        (
            {"count": 2, "ranks": [{"pid": 5, "env": {}, "gpus": [2]}]},
            "ranks[0].gpus must be GPU ordinals 0..1",
        ),
    ],
)
def test_malformed_gpu_layouts_are_refused_with_the_field(
    images: Path, keydir: Path, gpu: Any, needle: str
) -> None:
    m = dict(build_manifest("demo", "w1", FACTS, hash_files(images)))
    m["gpu"] = gpu
    m["id"] = compute_id(m)  # well-addressed, so only the layout is wrong
    with pytest.raises(ManifestError, match="manifest gpu: " + re.escape(needle)):
        validate_manifest(m)
    (images / "thaw-exec.json").write_bytes(orjson.dumps({"format": 1, "gpu": gpu}))
    if isinstance(gpu, dict) and gpu.get("ranks"):
        with pytest.raises(ManifestError, match="thaw-exec.json gpu layout: " + re.escape(needle)):
            image_gpu_layout(images)


def test_unreadable_exec_metadata_is_refused(images: Path) -> None:
    (images / "thaw-exec.json").write_bytes(b"{")
    with pytest.raises(ManifestError, match=r"thaw-exec\.json in .* is unreadable"):
        image_gpu_layout(images)


def test_hash_files_refuses_symlinks(images: Path) -> None:
    (images / "link.img").symlink_to("core-1.img")
    with pytest.raises(ManifestError, match="symlink"):
        hash_files(images)


def test_signature_covers_the_canonical_body(images: Path, keydir: Path) -> None:
    m = signed(images, keydir)
    body = {k: v for k, v in m.items() if k not in ("id", "signature")}
    pub = load_private_key(keydir / "signing.key").public_key()
    pub.verify(base64.b64decode(m["signature"]["value"]), canonical_json(body))


# --- plan ----------------------------------------------------------------------------------------


def test_plan_round_trip_and_every_bad_plan_is_cold(tmp_path: Path) -> None:
    p = tmp_path / "plan" / "plan.json"
    write_plan(p, restore_plan("/var/lib/thaw/cache/demo/" + "a" * 64, "sha256:" + "a" * 64))
    assert read_plan(p) == {"action": "restore", "path": "/var/lib/thaw/cache/demo/" + "a" * 64,
                            "snapshot": "sha256:" + "a" * 64}  # fmt: skip
    write_plan(p, cold_plan("because"))
    assert read_plan(p) == {"action": "cold", "reason": "because"}
    assert [x.name for x in p.parent.iterdir()] == ["plan.json"]  # no temp left behind
    assert read_plan(None)["action"] == "cold"
    assert "no restore plan at" in read_plan(tmp_path / "missing.json").get("reason", "")
    for raw, needle in [
        (b"{", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"action":"restore","path":"rel","snapshot":"sha256:x"}', "absolute"),
        (b'{"action":"restore","path":"/x"}', "snapshot"),
        (b'{"action":"dance"}', "'restore' or 'cold'"),
        (b"x" * 70_000, "larger"),
    ]:
        p.write_bytes(raw)
        plan = read_plan(p)
        assert plan["action"] == "cold" and needle in plan.get("reason", ""), (raw[:40], plan)
    p.unlink()
    p.mkdir()
    assert "cannot read" in read_plan(p).get("reason", "")


# --- node facts ----------------------------------------------------------------------------------


def test_gpu_product_is_written_like_gpu_feature_discovery() -> None:
    assert gfd_product("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert gfd_product(b"NVIDIA H200 ") == "NVIDIA-H200"


def test_version_parsers() -> None:
    proc = (
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  "
        "(dvs-builder@U22)  Thu Oct  2 2025\nGCC version:  gcc version 12.3.0\n"
    )
    assert parse_proc_version(proc) == "580.159.04"
    assert (
        parse_proc_version("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar")
        == "550.54.15"
    )
    assert parse_proc_version("garbage") is None
    assert parse_criu_version("Version: 4.2.1\nGitID: v4.2.1\n") == "4.2.1"
    assert parse_criu_version("") is None


def test_facts_file_replaces_detection_and_bad_files_say_why(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    p.write_bytes(orjson.dumps(FACTS))
    assert node_facts(p) == FACTS
    p.write_bytes(orjson.dumps({**FACTS, "gpu": {"product": "x", "count": -1}}))
    with pytest.raises(FactsError, match=r"f\.json.*gpu"):
        load_facts_file(p)
    with pytest.raises(FactsError, match="cannot read"):
        load_facts_file(tmp_path / "none.json")


def test_detected_facts_are_valid_on_this_machine() -> None:
    f = node_facts()
    assert f["arch"] == os.uname().machine and f["kernel"] == os.uname().release
    assert (f["gpu"]["count"] == 0) == (f["gpu"]["product"] == "none")


def test_criu_version_from_the_binary(tmp_path: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 9.9.9'\n")
    fake.chmod(0o755)
    assert detect_criu(str(fake)) == "9.9.9"
    assert detect_criu(str(tmp_path / "missing")) == "none"


def test_facts_difference_says_what_changed() -> None:
    d = facts_difference(facts(driver="590.1"), FACTS)
    assert d == "driver 590.1 here vs 580.159.04 in the snapshot"
    g = facts_difference(facts(gpu={"product": "NVIDIA-H200", "count": 8}), FACTS)
    assert g == "gpu NVIDIA-H200 here vs NVIDIA-H100-80GB-HBM3 in the snapshot"


# --- chunk digests, created, bounded reads (issue 11) ---------------------------------------------


def test_chunk_digests_cover_each_piece_and_are_checked(tmp_path: Path) -> None:
    d = tmp_path / "img"
    d.mkdir()
    data = os.urandom(5 * 1024 * 1024 + 17)
    (d / "pages-1.img").write_bytes(data)
    (d / "empty.img").write_bytes(b"")
    entries = {e["path"]: e for e in hash_files(d, chunk_bytes=1 << 20)}
    pages = entries["pages-1.img"]
    assert pages["sha256"] == hashlib.sha256(data).hexdigest()
    assert pages["chunks"] == [
        hashlib.sha256(data[i : i + (1 << 20)]).hexdigest() for i in range(0, len(data), 1 << 20)
    ]
    assert entries["empty.img"]["chunks"] == []
    m = build_manifest("demo", "w1", FACTS, list(entries.values()), chunk_bytes=1 << 20)
    assert m["chunk_bytes"] == 1 << 20
    for bad, needle in [
        ({**m, "chunk_bytes": 3000}, "chunk_bytes must be a power of two"),
        ({**m, "chunk_bytes": 1 << 31}, "chunk_bytes must be a power of two"),
        (
            {**m, "files": [{**pages, "chunks": pages["chunks"][:-1]}, entries["empty.img"]]},
            "must list 6 digest",
        ),
        ({**m, "files": [{**pages, "chunks": ["x"] * 6}, entries["empty.img"]]}, "64 lower-case hex"),
        ({k: v for k, v in m.items() if k != "chunk_bytes"}, "need the manifest's chunk_bytes"),
    ]:
        bad["id"] = compute_id(bad)
        with pytest.raises(ManifestError, match=needle):
            validate_manifest(bad)


@pytest.mark.parametrize("created", ["yesterday", "2026-11-28T05:40:00", ""])
def test_created_must_be_an_rfc3339_time_with_a_zone(images: Path, created: str) -> None:
    m = dict(build_manifest("demo", "w1", FACTS, hash_files(images)))
    m["created"] = created
    m["id"] = compute_id(m)
    with pytest.raises(ManifestError, match="created"):
        validate_manifest(m)


def test_plan_and_facts_files_never_block_or_follow_links(tmp_path: Path) -> None:
    """A FIFO or a symlink where the plan or facts.json should be: read at once, cold / refused."""
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    plan = read_plan(fifo)
    assert plan["action"] == "cold" and "FIFO" in plan.get("reason", "")
    (tmp_path / "real.json").write_bytes(orjson.dumps(FACTS))
    link = tmp_path / "facts.json"
    link.symlink_to(tmp_path / "real.json")
    with pytest.raises(FactsError, match="symlink"):
        read_facts_file(link)
    write_facts_file(tmp_path / "out" / "facts.json", FACTS)
    assert read_facts_file(tmp_path / "out" / "facts.json") == FACTS
    assert stat.S_IMODE((tmp_path / "out" / "facts.json").stat().st_mode) == 0o644
    (tmp_path / "big.json").write_bytes(b" " * 70_000 + orjson.dumps(FACTS))
    with pytest.raises(FactsError, match="more than"):
        read_facts_file(tmp_path / "big.json")


def _pci(root: Path, slot: str, vendor: str, klass: str, driver: str | None) -> None:
    d = root / "devices" / slot
    d.mkdir(parents=True)
    # sysfs attributes claim 4096 bytes whatever they hold
    (d / "vendor").write_text((vendor + "\n").ljust(4096))
    (d / "class").write_text((klass + "\n").ljust(4096))
    if driver:
        (root / "drivers" / driver).mkdir(parents=True, exist_ok=True)
        (d / "driver").symlink_to(root / "drivers" / driver)


def test_node_gpu_count_counts_every_gpu_of_the_node(tmp_path: Path) -> None:
    """A container given 1 of 4 GPUs sees 1 in NVML; sysfs shows the node's 4 (not its NVSwitch, not
    a GPU bound to vfio, not other vendors): the facts carry 4 wherever they are detected."""
    for i in range(4):
        _pci(tmp_path, f"0000:1{i}:00.0", "0x10de", "0x030200", "nvidia")
    _pci(tmp_path, "0000:20:00.0", "0x10de", "0x068000", "nvidia")  # NVSwitch
    _pci(tmp_path, "0000:21:00.0", "0x10de", "0x030200", "vfio-pci")  # passed to a VM
    _pci(tmp_path, "0000:22:00.0", "0x8086", "0x030000", "i915")
    assert pci_gpu_count(tmp_path / "devices") == 4
    assert node_gpu_count(1, tmp_path / "devices", tmp_path / "noproc") == 4
    proc = tmp_path / "proc"
    for i in range(2):
        (proc / "gpus" / f"0000:1{i}:00.0").mkdir(parents=True)
    assert node_gpu_count(1, tmp_path / "missing", proc) == 2  # no sysfs: the largest count seen
    assert pci_gpu_count(tmp_path / "missing") is None
