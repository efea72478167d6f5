"""The GPU layout of a snapshot (issue 6), recorded in its metadata at checkpoint time and checked at
restore.

How many GPUs the container saw and, for each CUDA process in lock order, its rank (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` from its environment) and the ordinals of the GPUs it had open (the
index of ``/dev/nvidiaN`` among the container's GPU device files, which is the order CUDA numbers
them without ``CUDA_VISIBLE_DEVICES``), and the GPUs' UUIDs. The CUDA driver restores each process
onto the same ordinals, so a restore needs a container that sees exactly as many GPUs; otherwise it
is refused before CRIU runs and the whole workload cold-starts.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("thaw.exec")

_GPU_DEV = re.compile(r"^/dev/nvidia(\d+)$")
RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")


def gpu_minors(targets: Iterable[str]) -> list[int]:
    """Minor numbers of the GPU device files among ``targets`` (fd targets or /dev entries)."""
    return sorted({int(m.group(1)) for t in targets if (m := _GPU_DEV.match(t))})


def visible_gpu_minors(dev: Path = Path("/dev")) -> list[int]:
    """The GPUs this container sees, as the minors of its /dev/nvidiaN files."""
    try:
        return gpu_minors(f"/dev/{e.name}" for e in dev.iterdir())
    except OSError:
        return []


def rank_env(pid: int) -> dict[str, str]:
    """The rank variables of a process's environment (as it was started)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {
        k.decode(): v.decode(errors="replace") for k, v in pairs if k.decode(errors="replace") in RANK_ENV
    }


def gpu_layout(
    cuda_pids: list[int],
    fds: dict[int, dict[int, str]],
    visible: list[int],
    envs: dict[int, dict[str, str]],
    uuids: list[str] | None = None,
) -> dict[str, Any]:
    """What a restore needs to map GPUs in order: the container's GPU count and their UUIDs in
    CUDA's order, and per CUDA process (lock order) its rank variables and the ordinals of the GPUs
    it had open."""
    order = {minor: i for i, minor in enumerate(visible)}
    ranks = []
    for pid in cuda_pids:
        minors = gpu_minors(fds.get(pid, {}).values())
        ranks.append(
            {
                "pid": pid,
                "env": envs.get(pid, {}),
                "gpus": [order[m] for m in minors if m in order],
            }
        )
    layout: dict[str, Any] = {"count": len(visible), "ranks": ranks}
    if uuids:
        layout["uuids"] = uuids
    return layout


def container_gpu_problem(layout: dict[str, Any] | None, visible_count: int) -> str | None:
    """Why this container cannot take the snapshot's GPU layout, or None."""
    if not layout or not layout.get("ranks"):
        return None  # no CUDA process: nothing to map
    want = int(layout.get("count", 0))
    if want != visible_count:
        used = sorted({g for r in layout["ranks"] for g in r.get("gpus", [])})
        return (
            f"the snapshot's {len(layout['ranks'])} CUDA processes ran on a container with {want} GPUs "
            f"(ordinals {used} in use); this container sees {visible_count}"
        )
    return None


def gpu_uuids_or_none(cuda: Any) -> list[str] | None:
    """This container's GPU UUIDs (CUDA's order); None without CUDA or on error, so that reading
    them never fails a checkpoint or a restore (remapping is then left to the driver's default)."""
    if cuda is None:
        return None
    try:
        uuids: list[str] = cuda.gpu_uuids()
    except Exception as exc:  # a best-effort probe: whatever it meets, checkpoint and restore go on
        log.warning("cannot read the GPUs' UUIDs (%s): no GPU remapping", exc)
        return None
    return uuids


# --- GPU memory (NVML through ctypes: the runtime bundle carries no pynvml) --------------------


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def gpu_used_bytes(minors: Iterable[int], lib: str = "libnvidia-ml.so.1") -> int | None:
    """Used memory of the GPUs whose ``/dev/nvidiaN`` minors are given, summed; None when NVML
    cannot say (no library, no such GPU)."""
    want = set(minors)
    if not want:
        return 0
    try:
        nvml = ctypes.CDLL(lib)
    except OSError as exc:
        log.info("cannot load %s (%s): the GPU state's size is unknown", lib, exc)
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        total, seen = 0, set()
        for i in range(count.value):
            handle = ctypes.c_void_p()
            minor = ctypes.c_uint(0)
            mem = _Memory()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                continue
            if nvml.nvmlDeviceGetMinorNumber(handle, ctypes.byref(minor)) != 0 or minor.value not in want:
                continue
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
                return None
            total += int(mem.used)
            seen.add(minor.value)
        return total if seen == want else None
    finally:
        nvml.nvmlShutdown()
