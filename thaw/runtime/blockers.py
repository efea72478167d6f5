"""What keeps a tree from being checkpointed, found before anything is frozen and said in one line
with the likely cause and the fix (docs/runtime.md, "What a fresh container does to a restore").

GPU device files held by a process without CUDA state of its own: the CUDA checkpoint releases the
device files of the processes it checkpoints, but a process with no CUDA context (PyTorch inductor's
compile workers, a process that only uses NVML, a child forked after CUDA was initialised) keeps
them, and CRIU cannot dump an open or mapped ``/dev/nvidia*`` (``handle_device_vma plugin failed …
Can't handle non-regular mapping``, one line per mapping). Refused before the CUDA lock, so the
server is never paused for a dump that cannot succeed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

GPU_DEVICE_PREFIX = "/dev/nvidia"
# PyTorch inductor's parallel compile: a SubprocPool whose workers are forked from
# torch/_inductor/compile_worker/__main__.py; their command lines all name it.
_COMPILE_WORKER = re.compile(r"torch[/.]_inductor[/.]compile_worker")
COMPILE_WORKER_FIX = (
    "TORCHINDUCTOR_COMPILE_THREADS=1 in the container's environment (the webhook sets it unless the pod "
    "sets it; compilation then runs in the server's own process)"
)
_CMDLINE_CHARS = 80


@dataclass(frozen=True)
class Holder:
    """A process that holds GPU device files (open or mapped) without CUDA state."""

    pid: int
    cmdline: str
    devices: tuple[str, ...]  # device paths, sorted, each once
    mappings: int  # how many of its memory mappings are GPU device files

    @property
    def compile_worker(self) -> bool:
        return bool(_COMPILE_WORKER.search(self.cmdline))


def mapping_paths(maps_text: str) -> list[str]:
    """The path of every file mapping of ``/proc/PID/maps`` text, one per mapping (pure)."""
    return [parts[5].strip() for line in maps_text.splitlines() if len(parts := line.split(None, 5)) == 6]


def mapped_devices(maps_text: str, prefix: str = GPU_DEVICE_PREFIX) -> list[str]:
    """The device paths of every mapping of ``/proc/PID/maps`` text under ``prefix``, one per
    mapping (pure)."""
    return [path for path in mapping_paths(maps_text) if path.startswith(prefix)]


def gpu_holders(
    pids: Iterable[int],
    cuda_pids: Iterable[int],
    fds: Mapping[int, Mapping[int, str]],
    maps: Mapping[int, Sequence[str]],
    cmdlines: Mapping[int, str],
    *,
    prefix: str = GPU_DEVICE_PREFIX,
) -> list[Holder]:
    """The processes of ``pids`` outside ``cuda_pids`` that hold ``prefix`` device files, open
    (``fds``: pid -> fd -> target) or mapped (``maps``: pid -> mapped device paths) (pure)."""
    with_state = set(cuda_pids)
    out = []
    for pid in pids:
        if pid in with_state:
            continue
        opened = [t for t in fds.get(pid, {}).values() if t.startswith(prefix)]
        mapped = list(maps.get(pid, ()))
        if opened or mapped:
            out.append(
                Holder(pid, cmdlines.get(pid, ""), tuple(sorted(set(opened) | set(mapped))), len(mapped))
            )
    return out


def _pid_ranges(pids: Sequence[int]) -> str:
    """4200-4203, 4210 (pure)."""
    spans: list[list[int]] = []
    for p in sorted(pids):
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _short(cmdline: str) -> str:
    return cmdline if len(cmdline) <= _CMDLINE_CHARS else cmdline[: _CMDLINE_CHARS - 1] + "…"


def holders_refusal(holders: Sequence[Holder]) -> str | None:
    """One line naming the holders (grouped by command line), what they hold, the likely cause and
    the fix; None when there are none (pure)."""
    if not holders:
        return None
    groups: dict[str, list[Holder]] = {}
    for h in holders:
        groups.setdefault(h.cmdline, []).append(h)
    parts = []
    for cmdline, hs in groups.items():
        devices = sorted({d for h in hs for d in h.devices})
        mappings = sum(h.mappings for h in hs)
        count = f"{len(hs)} x " if len(hs) > 1 else ""
        held = ", ".join(devices) + (f" ({mappings} mappings)" if mappings else " (open)")
        parts.append(f"pid {_pid_ranges([h.pid for h in hs])} ({count}{_short(cmdline) or '?'}): {held}")
    n = len(holders)
    head = (
        f"checkpoint refused before CRIU: {n} process{'es' if n > 1 else ''} of the tree hold GPU device "
        f"files without CUDA state of their own, which neither the CUDA checkpoint nor CRIU can carry: "
        + "; ".join(parts)
    )
    if all(h.compile_worker for h in holders):
        return (
            f"{head}. Likely cause: PyTorch inductor's compile workers (torch.compile's parallel "
            f"compilation), which stay alive after warm-up. Fix: {COMPILE_WORKER_FIX}"
        )
    workers = (
        " (some are inductor compile workers: TORCHINDUCTOR_COMPILE_THREADS=1)"
        if any(h.compile_worker for h in holders)
        else ""
    )
    return (
        f"{head}. Likely cause: a process that opened the GPU without a CUDA context (NVML left "
        f"initialised, a CUDA library initialised in a helper process, or a child forked after CUDA "
        f"was initialised){workers}. Fix: close the GPU in those processes before the server reports "
        f"ready (nvmlShutdown; start helpers with spawn, not fork), or run them outside this container"
    )


# Measured on driver 580 (docs/tensor-parallel.md, "How the set was found"): with NCCL's P2P
# transport (CUDA IPC between the ranks) the restore after the dump failed with
# CUDA_ERROR_INVALID_VALUE; with cuMem handles and the shared-memory transport,
# CUDA_ERROR_NOT_SUPPORTED. NVIDIA's cuda-checkpoint supports CUDA IPC from
# driver 610.
SHARED_GPU_MEMORY_ERRORS = ("CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_SUPPORTED")


def cuda_restore_hint(cuda_processes: int, error_name: str) -> str:
    """The likely cause and fix to append to a failed CUDA restore of a tree (pure): "" unless
    several CUDA processes failed the way memory shared between them does."""
    if cuda_processes < 2 or error_name not in SHARED_GPU_MEMORY_ERRORS:
        return ""
    return (
        "; likely GPU memory shared between the tree's CUDA processes (CUDA IPC: cudaIpc* handles, "
        "torch.multiprocessing CUDA tensors, NCCL's P2P transport, or cuMem handles with NCCL's "
        "shared-memory transport), which the CUDA checkpoint supports only from driver 610; fix: "
        "NCCL_P2P_DISABLE=1 and NCCL_CUMEM_ENABLE=0 (the webhook's tensor-parallel settings), and no "
        "CUDA IPC between the pod's processes (share through host memory)"
    )


# Runtimes whose restored CUDA processes are known not to survive, measured: a JAX server (jaxlib
# 0.11, XLA_PYTHON_CLIENT_PREALLOCATE=false) restored on an H200 with driver 580.159.04 died with
# SIGSEGV right after its CUDA state was put back (docs/compatibility.md, "GPU programs: the
# matrix"). Refusing the checkpoint spares every replica a fetch and a restore that would end in a
# cold start anyway.
_JAX_LIBRARY = re.compile(r"/(jaxlib|jax_plugins|jax_cuda\d+_(plugin|pjrt))/")
JAX_FIX = (
    "annotate the pod thaw.dev/checkpoint: never (it starts cold as it would without Thaw); JAX "
    "processes restored with driver 580 die with SIGSEGV once their GPU state is back"
)


def jax_refusal(cuda_pids: Sequence[int], maps: Mapping[int, Sequence[str]]) -> str | None:
    """One line refusing a tree whose CUDA processes run JAX/XLA (``maps``: each process's mapped file
    paths), with the fix; None otherwise (pure)."""
    users = [p for p in cuda_pids if any(_JAX_LIBRARY.search(path) for path in maps.get(p, ()))]
    if not users:
        return None
    return (
        f"checkpoint refused before CRIU: process {_pid_ranges(users)} runs JAX (jaxlib mapped) on the "
        f"GPU, and a restored JAX process does not survive the CUDA restore. Fix: {JAX_FIX}"
    )


# --- reading /proc -----------------------------------------------------------------------------


def read_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return ""
    # one line: arguments may hold newlines (python -c CODE)
    return " ".join(raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace").split())


def read_maps(pid: int) -> str:
    """``/proc/PID/maps``; "" for a process gone or unreadable."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()
    except OSError:
        return ""


def read_mapped_devices(pid: int, prefix: str | None = None) -> list[str]:
    return mapped_devices(read_maps(pid), prefix or GPU_DEVICE_PREFIX)


def gpu_holders_refusal(
    pids: Sequence[int],
    cuda_pids: Sequence[int],
    fds: Mapping[int, Mapping[int, str]],
    prefix: str | None = None,
) -> str | None:
    """:func:`holders_refusal` for the live tree ``pids`` (``fds`` as already read)."""
    prefix = prefix or GPU_DEVICE_PREFIX
    candidates = [p for p in pids if p not in set(cuda_pids) and os.path.exists(f"/proc/{p}")]
    maps = {p: read_mapped_devices(p, prefix) for p in candidates}
    cmdlines = {p: read_cmdline(p) for p in candidates}
    return holders_refusal(gpu_holders(candidates, cuda_pids, fds, maps, cmdlines, prefix=prefix))


def read_mapped_paths(pid: int) -> list[str]:
    """The file paths of every mapping of ``/proc/PID/maps`` (each once)."""
    return sorted(set(mapping_paths(read_maps(pid))))


def runtime_refusal(cuda_pids: Sequence[int]) -> str | None:
    """:func:`jax_refusal` for the live CUDA processes ``cuda_pids``."""
    return jax_refusal(cuda_pids, {p: read_mapped_paths(p) for p in cuda_pids})
