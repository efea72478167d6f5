"""The compatibility key, version 2 (thaw/contract/facts.py; docs/compatibility.md): what a routine
node change keeps, what changes it, and what becomes of snapshots keyed the version 1 way."""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.runtime.snapshots import FACTS
from thaw.contract.facts import (
    CPU_FLAGS_X86,
    FactsError,
    NodeFacts,
    compat_fields,
    compat_key,
    compat_version,
    criu_series,
    kernel_series,
    legacy_compat_key,
    validate_facts,
)
from thaw.contract.manifest import FileEntry, Manifest, build_manifest, compute_id, validate_manifest
from thaw.snapshot.fetch import choose
from thaw.snapshot.nodefacts import facts_difference, node_facts, parse_cpu_flags

# A Sapphire Rapids node as the agent reports it (flags as /proc/cpuinfo lists them, some not ISA).
_SPR = """
    fpu tsc cx8 sep cmov clflush mmx fxsr sse sse2 syscall rdtscp pni pclmulqdq ssse3 fma cx16
    sse4_1 sse4_2 movbe popcnt aes xsave osxsave avx f16c rdrand abm 3dnowprefetch fsgsbase bmi1
    avx2 bmi2 erms avx512f avx512dq rdseed adx clflushopt clwb avx512cd sha_ni avx512bw avx512vl
    xsaveopt xsavec xgetbv1 xsaves avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni
    avx512_bitalg avx512_vpopcntdq rdpid movdiri movdir64b serialize amx_bf16 avx512_fp16
    amx_tile amx_int8 avx_vnni avx512_bf16 avx512ifma
"""
SPR_FLAGS = _SPR.split()
NODE: NodeFacts = {**copy.deepcopy(FACTS), "kernel": "6.8.0-60-generic", "cpu": {"flags": SPR_FLAGS}}


def changed(**changes: Any) -> NodeFacts:
    f = copy.deepcopy(NODE)
    f.update(changes)  # type: ignore[typeddict-item]
    return f


def flags(drop: str = "", add: str = "") -> dict[str, list[str]]:
    out = [f for f in SPR_FLAGS if f not in drop.split()] + add.split()
    return {"flags": out}


@dataclass(frozen=True)
class Case:
    why: str
    facts: NodeFacts
    says: str = ""  # what facts_difference names


KEEPS = [
    Case("a kernel patch release keeps the key", changed(kernel="6.8.0-62-generic")),
    Case("a stable kernel update keeps the key", changed(kernel="6.8.12-1-pve")),
    Case("a CRIU minor or patch release keeps the key", changed(criu="4.3")),
    Case(
        "the node's GPU count is not in the key", changed(gpu={"product": NODE["gpu"]["product"], "count": 4})
    ),
    Case(
        "flags that no user code executes are not in the key",
        changed(cpu=flags(add="hypervisor constant_tsc arch_perfmon vmx ept tme monitor rep_good nopl")),
    ),
    Case("flag order and repeats do not matter", changed(cpu={"flags": sorted(SPR_FLAGS, reverse=True) * 2})),
]

CHANGES = [
    Case(
        "a driver upgrade changes the key",
        changed(driver="590.44.01"),
        "driver 590.44.01 here vs 580.159.04 in the snapshot",
    ),
    Case(
        "a driver patch release changes the key",
        changed(driver="580.159.05"),
        "driver 580.159.05 here vs 580.159.04",
    ),
    Case(
        "another GPU product changes the key",
        changed(gpu={"product": "NVIDIA-H200", "count": 8}),
        "gpu NVIDIA-H200 here vs NVIDIA-H100-80GB-HBM3 in the snapshot",
    ),
    Case(
        "a kernel minor release changes the key", changed(kernel="6.11.0-19-generic"), "(series 6.11 vs 6.8)"
    ),
    Case(
        "a CRIU major release changes the key",
        changed(criu="5.0"),
        "criu 5.0 here vs 4.2.1 in the snapshot (major version 5 vs 4)",
    ),
    Case("another architecture changes the key", changed(arch="aarch64"), "arch aarch64 here vs x86_64"),
    Case(
        "a CPU without AMX changes the key",
        changed(cpu=flags(drop="amx_tile amx_bf16 amx_int8")),
        "CPU flags amx_bf16, amx_int8, amx_tile in the snapshot only",
    ),
    Case(
        "a CPU without AVX-512 FP16 changes the key",
        changed(cpu=flags(drop="avx512_fp16")),
        "CPU flags avx512_fp16 in the snapshot only",
    ),
    Case(
        "a CPU without FMA changes the key (CRIU's own list lacks it)",
        changed(cpu=flags(drop="fma")),
        "CPU flags fma in the snapshot only",
    ),
    Case(
        "a CPU with TSX (rtm, hle: glibc's lock elision) changes the key",
        changed(cpu=flags(add="rtm hle")),
        "CPU flags hle, rtm here only",
    ),
]


@pytest.mark.parametrize("case", KEEPS, ids=lambda c: c.why)
def test_routine_changes_keep_the_key(case: Case) -> None:
    assert compat_key(case.facts) == compat_key(NODE)
    assert facts_difference(case.facts, NODE) == "facts equal but keys differ (facts with extra fields)"


@pytest.mark.parametrize("case", CHANGES, ids=lambda c: c.why)
def test_what_a_restore_depends_on_changes_the_key(case: Case) -> None:
    assert compat_key(case.facts) != compat_key(NODE)
    assert case.says in facts_difference(case.facts, NODE)


@pytest.mark.parametrize(
    ("release", "series"),
    [
        ("6.8.0-60-generic", "6.8"),
        ("6.18.44-fc-v769", "6.18"),
        ("5.14.0-362.8.1.el9_3.x86_64", "5.14"),
        ("6.1.0-28-cloud-amd64", "6.1"),
        ("weird", "weird"),
    ],
)
def test_kernel_series(release: str, series: str) -> None:
    assert kernel_series(release) == series


@pytest.mark.parametrize(("version", "major"), [("4.2.1", "4"), ("3.19", "3"), ("4", "4"), ("none", "none")])
def test_criu_series(version: str, major: str) -> None:
    assert criu_series(version) == major


def test_the_key_hashes_only_what_a_restore_depends_on() -> None:
    fields = compat_fields(NODE)
    assert fields == {
        "v": 2,
        "arch": "x86_64",
        "kernel": "6.8",
        "driver": "580.159.04",
        "gpu": "NVIDIA-H100-80GB-HBM3",
        "criu": "4",
        "cpu": sorted(set(SPR_FLAGS)),
    }
    assert set(fields["cpu"]) <= CPU_FLAGS_X86
    # facts without a cpu field (written before version 2, or by hand) hash as no flags
    bare = {k: v for k, v in NODE.items() if k != "cpu"}
    assert compat_key(bare) == compat_key(changed(cpu={"flags": []})) != compat_key(NODE)


def test_versions_tell_apart() -> None:
    assert compat_version(NODE, compat_key(NODE)) == 2
    assert compat_version(NODE, legacy_compat_key(NODE)) == 1
    assert compat_version(NODE, "0123456789abcdef") is None
    assert legacy_compat_key(NODE) != compat_key(NODE)


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse tsc msr hypervisor avx2 amx_tile constant_tsc avx512f
bugs\t\t: spectre_v1 spectre_v2

processor\t: 1
flags\t\t: fpu vme de pse tsc msr hypervisor avx2 amx_tile constant_tsc avx512f
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve
CPU implementer\t: 0x41
"""


def test_cpu_flags_from_cpuinfo() -> None:
    assert parse_cpu_flags(X86_CPUINFO, "x86_64") == ["amx_tile", "avx2", "avx512f", "fpu", "tsc"]
    arm = parse_cpu_flags(ARM_CPUINFO, "aarch64")
    features = ARM_CPUINFO.split("Features\t: ")[1].split("\n", maxsplit=1)[0]
    assert arm == sorted(features.split()) and "sve" in arm
    assert parse_cpu_flags("processor: 0\n", "x86_64") == []


def test_this_nodes_facts_carry_its_flags_and_a_stable_key() -> None:
    a, b = node_facts(), node_facts()
    assert compat_key(a) == compat_key(b)
    got = a.get("cpu", {"flags": []})["flags"]
    if platform.machine() == "x86_64":
        assert got and set(got) <= CPU_FLAGS_X86 and "sse2" in got
        cpuinfo = Path("/proc/cpuinfo").read_text()
        assert ("amx_tile" in got) == (" amx_tile" in cpuinfo)


@pytest.mark.parametrize(
    "cpu",
    [
        "avx2",
        {"flags": "avx2"},
        {"flags": [1]},
        {"flags": [""]},
        {"flags": ["x" * 65]},
        {"flags": ["f"] * 513},
    ],
)
def test_a_malformed_cpu_field_is_refused(cpu: object) -> None:
    with pytest.raises(FactsError, match="'cpu' must be"):
        validate_facts({**NODE, "cpu": cpu})


FILES: list[FileEntry] = [{"path": "pages-1.img", "size": 4096, "sha256": "ab" * 32}]


def manifest(facts: NodeFacts) -> Manifest:
    return build_manifest("demo", "w1", facts, FILES, created="2026-11-28T05:40:00Z")


@dataclass(frozen=True)
class Listed:
    manifest: Any
    stored_at: float | None = None


def legacy_manifest(facts: NodeFacts) -> dict[str, Any]:
    """A manifest as Thaw wrote it before key version 2: compat = the facts hashed whole."""
    m: dict[str, Any] = dict(manifest(facts))
    m["compat"] = legacy_compat_key(facts)
    m.pop("id")
    m["id"] = compute_id(m)
    return m


def test_a_version_1_snapshot_reads_but_is_refused_with_the_reason() -> None:
    old = validate_manifest(legacy_manifest(NODE))  # still well-formed: listed, evicted, explained
    assert compat_version(old["facts"], old["compat"]) == 1
    usable, why = choose([Listed(old)], "demo", "w1", NODE, now=1.9e9)
    assert usable == [] and why is not None
    assert why.startswith("incompatible: 1 snapshot(s) of demo")
    assert "taken by an older Thaw (compatibility key version 1" in why
    assert "does not restore; the next pod with checkpoint on-ready takes a new one" in why
    # the same snapshot taken now, on a node one kernel patch behind, is this node's
    new = manifest(changed(kernel="6.8.0-58-generic"))
    usable, why = choose([Listed(old), Listed(new)], "demo", "w1", NODE, now=1.9e9)
    assert why is None and [m["id"] for m in usable] == [new["id"]]


def test_a_manifest_whose_compat_is_no_key_of_its_facts_is_malformed() -> None:
    m: dict[str, Any] = dict(manifest(NODE))
    m["compat"] = compat_key(changed(driver="1.2.3"))
    m.pop("id")
    m["id"] = compute_id(m)
    with pytest.raises(ValueError, match="is not the key of its facts"):
        validate_manifest(m)
