"""Whether a checkpoint fits before it is taken (issue 11.6): the dump's size is estimated from the
tree's memory, and the checkpoint is refused with the reason when the work emptyDir, the node
cache, or the container's memory limit cannot take it.

- The dump is about the tree's private memory (anonymous pages, swap, shared memory) plus the GPU
  memory that the CUDA checkpoint copies into the processes' host memory just before CRIU writes it
  out. GPU memory is read per device (NVML: the used memory of the GPUs the CUDA processes hold, an
  upper bound), before the CUDA checkpoint.
- The container's memory limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the lowest
  of the container's cgroup and its visible ancestors) minus its working set (usage less inactive
  file pages, as kubelet counts it) must take the GPU state's host copy, and the dump itself when
  the work directory is in memory (tmpfs: an emptyDir with ``medium: Memory``), else the kernel
  OOM-kills the workload mid-checkpoint.
- The cache's room (thaw-sidecar reports it in ``<work>/sidecar.json``, or read here when ``thaw
  exec`` publishes in-process) must take the snapshot.

Pure functions decide; thin readers of /proc, /sys and NVML feed them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from thaw.snapshot.cache import (
    MEMORY_FS,
    _fs_type,  # the same longest-mount-prefix rule as the cache's tier
)

log = logging.getLogger("thaw.exec")

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 62  # cgroup v1 writes "no limit" as a page-rounded LONG_MAX
# The dump's metadata, ghost files (deleted files still open: up to criu.GHOST_LIMIT) and estimate
# error: added to the estimated bytes.
DUMP_MARGIN_FRACTION = 0.05
DUMP_MARGIN_BYTES = 64 << 20
MEMORY_MARGIN_BYTES = 256 << 20  # what CRIU itself and the CUDA driver's buffers take meanwhile


@dataclass(frozen=True)
class Need:
    """What a checkpoint of the tree needs."""

    tree_bytes: int  # the tree's private memory now
    gpu_bytes: int | None  # GPU memory the CUDA checkpoint copies into host memory (None: unknown)

    @property
    def dump_bytes(self) -> int:
        raw = self.tree_bytes + (self.gpu_bytes or 0)
        return int(raw * (1 + DUMP_MARGIN_FRACTION)) + DUMP_MARGIN_BYTES


@dataclass(frozen=True)
class Room:
    """What there is to take it; None where there is no limit (or it could not be read)."""

    work: Path
    work_free: int | None
    work_in_memory: bool
    cache_room: int | None
    memory_limit: int | None
    memory_used: int | None


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def refusal(need: Need, room: Room) -> str | None:
    """Why the checkpoint cannot be taken here, or None (pure)."""
    dump = need.dump_bytes
    what = f"about {gib(dump)} (the tree's {gib(need.tree_bytes)} of memory"
    what += f" + {gib(need.gpu_bytes)} of GPU state)" if need.gpu_bytes else ")"
    if room.work_free is not None and dump > room.work_free:
        return f"not enough room for the dump: it needs {what}, {room.work} has {gib(room.work_free)} free"
    if room.cache_room is not None and dump > room.cache_room:
        return (
            f"the node cache cannot take the snapshot: it needs {what}, the cache can take at most "
            f"{gib(room.cache_room)} (its budget, or its disk with every unused snapshot evicted)"
        )
    if room.memory_limit is not None and room.memory_used is not None:
        left = room.memory_limit - room.memory_used
        host = need.gpu_bytes or 0
        in_memory = dump if room.work_in_memory else 0
        want = host + in_memory
        if want and want + MEMORY_MARGIN_BYTES > left:
            parts = []
            if host:
                parts.append(f"the CUDA checkpoint copies {gib(host)} of GPU state into host memory")
            if in_memory:
                parts.append(f"the dump ({gib(dump)}) goes to {room.work}, which is in memory")
            return (
                f"the container's memory limit cannot take the checkpoint: {' and '.join(parts)}; "
                f"{gib(max(left, 0))} is left under its limit of {gib(room.memory_limit)} "
                f"(raise the container's memory limit)"
            )
    return None


# --- the tree's memory -------------------------------------------------------------------------


_SMAPS_FIELDS = ("Anonymous", "Swap", "Pss_Shmem")


def parse_smaps_rollup(text: str) -> int:
    """Bytes of a process's memory that a dump carries: anonymous, swapped out, and its share of
    shared memory (pure)."""
    total = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in _SMAPS_FIELDS:
            parts = rest.split()
            if parts and parts[0].isdigit():
                total += int(parts[0]) * 1024
    return total


def tree_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
        except OSError:
            continue  # exited meanwhile
    return total


# --- the container's memory limit --------------------------------------------------------------


def cgroup_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 memory path) from the text of /proc/self/cgroup (pure)."""
    v2 = v1 = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key and v.strip().isdigit():
                return int(v)
    except OSError:
        pass
    return 0


def _ancestors(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each parent up to ``base``, those that exist (a container with its own
    cgroup namespace sees its cgroup as ``base`` itself)."""
    out: list[Path] = []
    parts = [p for p in rel.split("/") if p and p != ".."]
    for i in range(len(parts), -1, -1):
        d = base.joinpath(*parts[:i])
        if d.is_dir():
            out.append(d)
    return out


def memory_limit_and_use(
    proc_cgroup: str | None = None, root: Path = CGROUP_ROOT
) -> tuple[int | None, int | None]:
    """(the lowest memory limit over the container's cgroup and its visible ancestors, its working
    set); (None, None) without a limit or a memory controller."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None, None
    v2, v1 = cgroup_paths(proc_cgroup)
    # Hybrid hosts mount v2 without controllers at unified/: the memory controller is v1's there.
    if v1 is not None and (root / "memory").is_dir():
        dirs = _ancestors(root / "memory", v1)
        limit_file, usage_file, inactive = (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    elif v2 is not None and (root / "cgroup.controllers").is_file():
        dirs = _ancestors(root, v2)
        limit_file, usage_file, inactive = "memory.max", "memory.current", "inactive_file"
    else:
        return None, None
    limits = [v for d in dirs if (v := _read_int(d / limit_file)) is not None and v < NO_LIMIT]
    if not limits or not dirs:
        return None, None
    own = dirs[0]
    usage = _read_int(own / usage_file)
    if usage is None:
        return min(limits), None
    return min(limits), max(0, usage - _stat_value(own / "memory.stat", inactive))


# --- filesystems -------------------------------------------------------------------------------


def free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room(work: Path, cache_room: int | None) -> Room:
    limit, used = memory_limit_and_use()
    return Room(
        work=work,
        work_free=free_bytes(work),
        work_in_memory=_fs_type(work) in MEMORY_FS,
        cache_room=cache_room,
        memory_limit=limit,
        memory_used=used,
    )
