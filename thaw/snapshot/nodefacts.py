"""Detecting this node's facts (thaw.contract.facts.NodeFacts): GPU product and count, driver, CRIU,
kernel, arch, and the CPU's instruction-set flags (``/proc/cpuinfo``: x86 ``flags``, arm64
``Features``; only those the compatibility key reads are kept).

Sources, first that works: NVML through nvidia-ml-py; ``nvidia-smi``; ``/proc/driver/nvidia``. With
none of them the node has no GPU (product "none", count 0, driver "none").

The count is the *node's*: inside a container the NVIDIA runtime shows only the GPUs the container
was given (NVML, ``nvidia-smi`` and ``/proc/driver/nvidia/gpus`` alike), while the GPU-less
``thaw-fetch`` and the agent see every one, and the keys of one node would then differ. So the
count is the number of NVIDIA display controllers (PCI class 0x03, not the NVSwitches) bound to the
``nvidia`` driver in sysfs, which every container sees whole; the largest of the counts where sysfs
cannot be read. The container's own GPUs are in the manifest's GPU layout (thaw/runtime/gpu.py).

The product is written the way NVIDIA GPU Feature Discovery writes ``nvidia.com/gpu.product``
(spaces become '-'), so the extender's fallback on GFD labels and our facts agree. ``--facts FILE``
replaces detection.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from thaw.contract.facts import (
    COMPAT_VERSION,
    GpuFacts,
    NodeFacts,
    compat_fields,
    compat_version,
    isa_flags,
    read_facts_file,
    validate_facts,
)
from thaw.contract.safeio import read_bounded

log = logging.getLogger("thaw.nodefacts")

NONE = "none"
REPO = Path(__file__).resolve().parents[2]
BUNDLED_CRIU = REPO / ".tools" / "criu" / "bin" / "criu"
PROC_NVIDIA = Path("/proc/driver/nvidia")
PROC_CPUINFO = Path("/proc/cpuinfo")
MAX_CPUINFO_BYTES = 8 * 1024 * 1024  # ~2 kB per CPU; 8 MiB holds thousands
SYS_PCI_DEVICES = Path("/sys/bus/pci/devices")
NVIDIA_VENDOR = "0x10de"
SYSFS_ATTR_BYTES = 4096
TOOL_TIMEOUT_S = 20


def gfd_product(name: str | bytes) -> str:
    """A GPU name as GPU Feature Discovery labels it: 'NVIDIA H100 80GB HBM3' -> 'NVIDIA-H100-80GB-HBM3'."""
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return "-".join(name.strip().split())


def load_facts_file(path: Path) -> NodeFacts:
    """``--facts FILE`` (bounded read, validated): thaw.contract.facts.read_facts_file."""
    return read_facts_file(path)


def pci_gpu_count(devices: Path = SYS_PCI_DEVICES) -> int | None:
    """NVIDIA GPUs of the node in sysfs: vendor 0x10de, class 0x03xxxx (display controllers; an
    NVSwitch is a bridge, 0x0680), bound to the ``nvidia`` driver. None when sysfs cannot be listed."""
    try:
        entries = sorted(devices.iterdir())
    except OSError:
        return None
    count = 0
    for d in entries:
        try:
            # sysfs attributes say 4096 bytes whatever they hold
            vendor = read_bounded(d / "vendor", SYSFS_ATTR_BYTES).decode().strip()
            klass = read_bounded(d / "class", SYSFS_ATTR_BYTES).decode().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if vendor != NVIDIA_VENDOR or not klass.startswith("0x03"):
            continue
        try:
            driver = os.path.basename(os.readlink(d / "driver"))
        except OSError:
            continue
        if driver == "nvidia":
            count += 1
    return count


def _gpu_from_nvml() -> tuple[GpuFacts, str] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        count = int(pynvml.nvmlDeviceGetCount())
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        product = (
            gfd_product(pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))) if count else NONE
        )
        return {"product": product, "count": count}, driver
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown: %s", exc)


def _gpu_from_smi() -> tuple[GpuFacts, str] | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed: %s", exc)
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
    rows = [r for r in rows if len(r) == 2]
    if not rows:
        return None
    return {"product": gfd_product(rows[0][0]), "count": len(rows)}, rows[0][1]


def parse_proc_version(text: str) -> str | None:
    """The driver version in /proc/driver/nvidia/version ('NVRM version: ... Kernel Module  580.159.04')."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def _gpu_from_proc(root: Path = PROC_NVIDIA) -> tuple[GpuFacts, str] | None:
    try:
        driver = parse_proc_version((root / "version").read_text())
    except OSError:
        return None
    if driver is None:
        return None
    gpus = sorted((root / "gpus").glob("*/information")) if (root / "gpus").is_dir() else []
    product = NONE
    if gpus:
        m = re.search(r"^Model:\s*(.+)$", gpus[0].read_text(errors="replace"), re.MULTILINE)
        product = gfd_product(m.group(1)) if m else NONE
    return {"product": product, "count": len(gpus)}, driver


def node_gpu_count(seen: int, sys_devices: Path = SYS_PCI_DEVICES, proc: Path = PROC_NVIDIA) -> int:
    """Every GPU of the node (module docstring): sysfs's count where it can be read, else the
    largest of ``seen`` (what the answering source counted) and /proc/driver/nvidia/gpus."""
    pci = pci_gpu_count(sys_devices)
    if pci is not None and pci > 0:
        return pci
    try:
        in_proc = sum(1 for _ in (proc / "gpus").iterdir())
    except OSError:
        in_proc = 0
    return max(seen, in_proc)


def detect_gpu() -> tuple[GpuFacts, str]:
    """(GPU product and the node's GPU count, driver version), from the first source that answers."""
    for source in (_gpu_from_nvml, _gpu_from_smi, _gpu_from_proc):
        found = source()
        if found is not None:
            gpu, driver = found
            if gpu["product"] == NONE and gpu["count"] == 0:
                return gpu, driver
            return {"product": gpu["product"], "count": node_gpu_count(gpu["count"])}, driver
    return {"product": NONE, "count": 0}, NONE


def criu_binary(criu: str | None = None) -> str | None:
    """The CRIU binary: ``criu`` argument, env THAW_CRIU, PATH, or the repository's .tools install."""
    for candidate in (criu, os.environ.get("THAW_CRIU")):
        if candidate:
            return candidate
    found = shutil.which("criu")
    if found:
        return found
    return str(BUNDLED_CRIU) if BUNDLED_CRIU.exists() else None


def parse_criu_version(text: str) -> str | None:
    """'Version: 4.2.1' (first line of ``criu --version``) -> '4.2.1'."""
    m = re.search(r"Version:\s*(\S+)", text)
    return m.group(1) if m else None


def detect_criu(criu: str | None = None) -> str:
    binary = criu_binary(criu)
    if binary is None:
        return NONE
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot run %s --version: %s", binary, exc)
        return NONE
    return parse_criu_version(out.stdout) or NONE


def parse_cpu_flags(text: str, arch: str) -> list[str]:
    """The key's CPU flags from /proc/cpuinfo: the first ``flags`` (x86) or ``Features`` (arm64)
    line, filtered by thaw.contract.facts.isa_flags. Every CPU of a node lists the same."""
    m = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return isa_flags(arch, m.group(1).split()) if m else []


def detect_cpu_flags(arch: str, cpuinfo: Path = PROC_CPUINFO) -> list[str]:
    try:
        text = read_bounded(cpuinfo, MAX_CPUINFO_BYTES).decode(errors="replace")
    except OSError as exc:
        log.warning("cannot read %s: %s (no CPU flags in the facts)", cpuinfo, exc)
        return []
    return parse_cpu_flags(text, arch)


def node_facts(facts_file: Path | None = None, criu: str | None = None) -> NodeFacts:
    """This node's facts: the validated ``facts_file`` when given, else detected."""
    if facts_file is not None:
        return load_facts_file(facts_file)
    gpu, driver = detect_gpu()
    arch = platform.machine()
    facts: dict[str, Any] = {
        "arch": arch,
        "kernel": platform.release(),
        "gpu": gpu,
        "driver": driver,
        "criu": detect_criu(criu),
        "cpu": {"flags": detect_cpu_flags(arch)},
    }
    return validate_facts(facts)


def facts_difference(mine: NodeFacts, theirs: NodeFacts, their_compat: str | None = None) -> str:
    """Why this node cannot restore a snapshot taken on ``theirs`` (keyed ``their_compat``), for
    people: the facts the key reads that differ, each as the node and the snapshot have it, e.g.
    'driver 580.159.04 here vs 550.54.15 in the snapshot'. Differences the key ignores (a kernel
    patch release, the GPU count) are not reasons and are not named."""
    diffs: list[str] = []
    if their_compat is not None and compat_version(theirs, their_compat) == 1:
        diffs.append(
            f"taken by an older Thaw (compatibility key version 1: the facts whole, exact kernel "
            f"release and GPU count included), which this Thaw (version {COMPAT_VERSION}) does not "
            "restore; the next pod with checkpoint on-ready takes a new one"
        )
    a, b = compat_fields(mine), compat_fields(theirs)
    for key in ("arch", "driver"):
        if a[key] != b[key]:
            diffs.append(f"{key} {mine[key]} here vs {theirs[key]} in the snapshot")
    if a["kernel"] != b["kernel"]:
        diffs.append(
            f"kernel {mine['kernel']} here vs {theirs['kernel']} in the snapshot "
            f"(series {a['kernel']} vs {b['kernel']})"
        )
    if a["criu"] != b["criu"]:
        diffs.append(
            f"criu {mine['criu']} here vs {theirs['criu']} in the snapshot "
            f"(major version {a['criu']} vs {b['criu']})"
        )
    if a["gpu"] != b["gpu"]:
        diffs.append(f"gpu {mine['gpu']['product']} here vs {theirs['gpu']['product']} in the snapshot")
    if a["cpu"] != b["cpu"]:
        only_here = sorted(set(a["cpu"]) - set(b["cpu"]))
        only_there = sorted(set(b["cpu"]) - set(a["cpu"]))
        parts = [
            f"{', '.join(only_here[:8])} here only" if only_here else "",
            f"{', '.join(only_there[:8])} in the snapshot only" if only_there else "",
        ]
        diffs.append("CPU flags " + "; ".join(x for x in parts if x))
    return ", ".join(diffs) or "facts equal but keys differ (facts with extra fields)"
