"""Node facts and the compatibility key (DESIGN.md, "Node annotations"; docs/compatibility.md).

The facts say what a node is (``thaw.dev/facts``, and the ``facts`` of every manifest); the key says
which of them a restore depends on. A snapshot is restored only on a node whose key is the key of
the facts it was taken on. Key version 2 (:func:`compat_fields`) holds exactly what CRIU and the CUDA
checkpoint need to be the same, and nothing a routine node patch changes:

- ``arch``: the machine (CRIU restores a process of its own architecture only).
- ``kernel``: the series, ``major.minor`` ("6.8.0-60-generic" -> "6.8"). CRIU probes kernel features
  at run time and proxies a changed vDSO (criu/pie/parasite-vdso.c); what a process learnt about its
  kernel at start (rseq, clone3, io_uring ops) comes with minor releases, not patch releases.
- ``driver``: exact. The process has the driver's user-mode libraries mapped (libcuda.so.VERSION,
  bind-mounted from the host), which CRIU finds again by path and checks by size and build-id, and
  they must match the kernel module.
- ``gpu``: the product as GPU Feature Discovery labels it. The CUDA restore needs "the same chip
  type" and enough memory (cuCheckpointProcessRestore); the product names both. Not the node's GPU
  count: the container's own GPUs are in the manifest's GPU layout, which ``thaw exec`` checks.
- ``criu``: the major version. CRIU reads images of older releases (protobuf images, image format
  version 2 since CRIU 1.x: criu/image.c).
- ``cpu``: the instruction-set flags a restored process may have chosen code paths for (glibc's
  ifuncs, oneDNN's JIT, AMX): the flags of :data:`CPU_FLAGS_X86` the node has (CRIU's own
  instruction check, criu/arch/x86/cpu.c, is off unless ``--cpu-cap`` is given, and lacks FMA,
  AVX-512 BF16/FP16, AVX-VNNI and AMX). Other flags (virtualisation, bugs, power) are left out.

Version 1 keys (Thaw before this version) hashed the facts whole: the exact kernel release and the
node's GPU count. A manifest keyed that way still reads (``compat_version`` says 1), but no node
matches it: ``thaw fetch`` names the reason, the agent evicts such copies, and the next pod with
``checkpoint: on-ready`` takes a new snapshot.

Pure functions, and the facts file (``facts.json``) that ``thaw fetch`` writes beside the plan so that
every Thaw container of a pod uses the same facts; detecting a node's facts (NVML, uname, criu
--version, /proc/cpuinfo) is thaw.snapshot.nodefacts'.

The facts are the *node's*: ``gpu.count`` counts every GPU of the node, whatever the container was
given, so a workload container, the GPU-less ``thaw-fetch`` and the agent all read the same facts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from thaw.contract.canonical import canonical_json, digest
from thaw.contract.safeio import read_bounded, write_atomic

COMPAT_KEY_HEX_DIGITS = 16
COMPAT_VERSION = 2  # what compat_key computes; 1: the facts hashed whole (compat_version)
MAX_CPU_FLAGS = 512  # /proc/cpuinfo lists ~150 flags on x86; the ISA list keeps ~80
MAX_FLAG_CHARS = 64

# x86 flags (as /proc/cpuinfo names them) that user code can execute or hold state in, so that a
# process may have picked code for them before the checkpoint, in CPUID order (1 EDX, 0x80000001
# EDX, 1 ECX, 0x80000001 ECX, 7.0 EBX, 0xD.1 EAX, 7.0 ECX/EDX, 7.1 EAX, 0x80000008 EBX). CRIU's
# instruction list (x86_ins_capability_mask, criu/arch/x86/cpu.c) and its FPU checks (fxsr, osxsave,
# xsaves and the xsave features: avx, avx512*, mpx, pku/ospke, amx_*), less what user code cannot
# use (monitor: ring 0; tme: memory encryption; rep_good, nopl: the kernel's own), plus what
# libraries dispatch on that CRIU's list lacks (fma, avx512_bf16, avx512_fp16, avx_vnni, amx_*, ...).
# pni is SSE3, abm is LZCNT.
_X86_ISA = """
    fpu tsc cx8 sep cmov clflush mmx fxsr sse sse2 syscall mmxext rdtscp 3dnowext 3dnow
    pni pclmulqdq ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave osxsave avx f16c rdrand
    abm sse4a misalignsse 3dnowprefetch xop fma4 tbm lahf_lm
    fsgsbase bmi1 hle avx2 bmi2 erms rtm mpx avx512f avx512dq rdseed adx
    clflushopt clwb avx512pf avx512er avx512cd sha_ni avx512bw avx512vl avx512ifma
    xsaveopt xsavec xgetbv1 xsaves
    avx512vbmi pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg
    avx512_vpopcntdq rdpid cldemote movdiri movdir64b enqcmd avx512_4vnniw avx512_4fmaps
    avx512_vp2intersect serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8
    avx_vnni avx512_bf16 amx_fp16 avx_ifma avx_vnni_int8 avx_ne_convert amx_complex
    sha512 sm3 sm4 user_shstk clzero
"""
CPU_FLAGS_X86 = frozenset(_X86_ISA.split())
CPU_FLAG_ARCHES_ALL = frozenset({"aarch64", "arm64"})  # their /proc/cpuinfo Features are all HWCAPs


class GpuFacts(TypedDict):
    product: str
    count: int


class CpuFacts(TypedDict):
    flags: list[str]  # sorted: the instruction-set flags of CPU_FLAGS_X86 (x86) or the HWCAPs (arm64)


class NodeFacts(TypedDict):
    arch: str
    kernel: str
    gpu: GpuFacts
    driver: str
    criu: str
    cpu: NotRequired[CpuFacts]  # absent in facts written before key version 2


FACT_KEYS = ("arch", "kernel", "gpu", "driver", "criu")  # required; also what a version 1 key hashed
FACTS_NAME = "facts.json"  # beside plan.json in the plan emptyDir
MAX_FACTS_BYTES = 64 * 1024
_SERIES = re.compile(r"^(\d+)\.(\d+)")
_MAJOR = re.compile(r"^(\d+)(?:\.|$)")


class FactsError(ValueError):
    """Facts that are not the documented shape; the message says which field and why."""


def kernel_series(release: str) -> str:
    """'6.8.0-60-generic' -> '6.8'; a release that does not start with major.minor stays whole."""
    m = _SERIES.match(release)
    return f"{m.group(1)}.{m.group(2)}" if m else release


def criu_series(version: str) -> str:
    """'4.2.1' -> '4'; 'none' (no CRIU) and other text stay whole."""
    m = _MAJOR.match(version)
    return m.group(1) if m else version


def isa_flags(arch: str, flags: Any) -> list[str]:
    """The flags that take part in the key: on x86 those of CPU_FLAGS_X86, on arm64 all (HWCAPs),
    sorted and without duplicates."""
    seen = (
        {f for f in flags if isinstance(f, str)}
        if isinstance(flags, list | tuple | set | frozenset)
        else set()
    )
    if arch not in CPU_FLAG_ARCHES_ALL:
        seen &= CPU_FLAGS_X86
    return sorted(seen)


def compat_fields(facts: Mapping[str, Any]) -> dict[str, Any]:
    """What the version 2 key hashes (module docstring): the facts a restore depends on."""
    cpu = facts.get("cpu")
    flags = cpu.get("flags") if isinstance(cpu, dict) else None
    return {
        "v": COMPAT_VERSION,
        "arch": facts["arch"],
        "kernel": kernel_series(facts["kernel"]),
        "driver": facts["driver"],
        "gpu": facts["gpu"]["product"],
        "criu": criu_series(facts["criu"]),
        "cpu": isa_flags(facts["arch"], flags),
    }


def compat_key(facts: NodeFacts | dict[str, Any]) -> str:
    """The compatibility key of a node's facts (version 2): the first 16 hex digits of the sha256 of
    the canonical JSON of :func:`compat_fields`."""
    return digest(compat_fields(facts))[:COMPAT_KEY_HEX_DIGITS]


def legacy_compat_key(facts: NodeFacts | dict[str, Any]) -> str:
    """The version 1 key of the same facts: the five original fields hashed whole."""
    whole: dict[str, Any] = dict(facts)
    return digest({k: whole[k] for k in FACT_KEYS})[:COMPAT_KEY_HEX_DIGITS]


def compat_version(facts: NodeFacts | dict[str, Any], compat: str) -> Literal[1, 2] | None:
    """Which key version ``compat`` is of ``facts`` (a manifest's pair), or None when it is neither."""
    if compat == compat_key(facts):
        return 2
    if compat == legacy_compat_key(facts):
        return 1
    return None


def validate_facts(value: Any) -> NodeFacts:
    """Check that ``value`` has the documented facts shape, and return it typed."""
    if not isinstance(value, dict):
        raise FactsError(f"node facts must be a JSON object, got {type(value).__name__}")
    missing = [k for k in FACT_KEYS if k not in value]
    if missing:
        raise FactsError(f"node facts lack {', '.join(missing)} (required: {', '.join(FACT_KEYS)})")
    for key in ("arch", "kernel", "driver", "criu"):
        if not isinstance(value[key], str):
            raise FactsError(f"node facts field {key!r} must be a string, got {value[key]!r}")
    gpu = value["gpu"]
    if (
        not isinstance(gpu, dict)
        or not isinstance(gpu.get("product"), str)
        or not isinstance(gpu.get("count"), int)
        or isinstance(gpu.get("count"), bool)
        or gpu["count"] < 0
    ):
        raise FactsError(
            f'node facts field \'gpu\' must be {{"product": string, "count": integer >= 0}}, got {gpu!r}'
        )
    if "cpu" in value:
        cpu = value["cpu"]
        flags = cpu.get("flags") if isinstance(cpu, dict) else None
        if (
            not isinstance(flags, list)
            or len(flags) > MAX_CPU_FLAGS
            or not all(isinstance(f, str) and 0 < len(f) <= MAX_FLAG_CHARS for f in flags)
        ):
            raise FactsError(
                f"node facts field 'cpu' must be {{\"flags\": [string, ...]}} with at most {MAX_CPU_FLAGS} "
                f"flags of 1 to {MAX_FLAG_CHARS} characters, got {str(cpu)[:200]}"
            )
    return value  # type: ignore[return-value]  # shape checked above


def facts_path(plan_path: Path) -> Path:
    """Where ``thaw fetch`` leaves the facts it used: ``facts.json`` beside the plan."""
    return plan_path.parent / FACTS_NAME


def read_facts_file(path: Path) -> NodeFacts:
    """Facts from a file: bounded (regular file, no symlink, no FIFO, at most 64 KiB) and validated.
    FactsError naming the file and what is wrong."""
    try:
        raw = read_bounded(path, MAX_FACTS_BYTES)
    except OSError as exc:
        raise FactsError(f"cannot read facts file {path}: {exc.strerror or exc}") from None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FactsError(f"facts file {path} is not JSON ({exc})") from None
    try:
        return validate_facts(value)
    except FactsError as exc:
        raise FactsError(f"facts file {path}: {exc}") from None


def write_facts_file(path: Path, facts: NodeFacts) -> None:
    """Write ``facts`` atomically (a reader sees the old file, none, or the whole new one), readable
    by the workload container's user."""
    validate_facts(facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, canonical_json(facts) + b"\n", mode=0o644, fsync=True)
