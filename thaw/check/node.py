"""``thaw check node``: can this node checkpoint and restore?

Run it on a GPU node as root, or in a pod of a restore-allowed namespace (there it also says whether
the webhook's capabilities reached the container). Each ``check_*`` judges what was read (pure);
``run_node`` reads it.
"""

from __future__ import annotations

import os
import platform
import re
import stat as stat_mod
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from thaw.check.lines import Line, fail, ok, warn

MIN_KERNEL = (5, 9)  # CAP_CHECKPOINT_RESTORE
MIN_CRIU = (4, 0)  # what Thaw is tested with (the image bundles 4.2.1)
MIN_DRIVER = 570  # the CUDA checkpoint API with restore (thaw.runtime.cuda)
CAP_SYS_PTRACE = 19
CAP_CHECKPOINT_RESTORE = 40
CRIU_CHECK_TIMEOUT_S = 60
GIB = 1 << 30
DEFAULT_MIN_FREE = 50 * GIB
# Filesystems a hostPath cache should not be on: the container's own layer, or nothing persistent.
NOT_A_HOST_DISK = {"overlay": "the container's overlay filesystem (is the hostPath mounted?)"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def check_kernel(release: str) -> Line:
    v = _version(release)
    if v[:2] >= MIN_KERNEL:
        return ok("kernel", f"{release} (CAP_CHECKPOINT_RESTORE needs >= 5.9)")
    return fail(
        "kernel",
        f"{release}: older than 5.9, no CAP_CHECKPOINT_RESTORE",
        "CRIU would need CAP_SYS_ADMIN here, which Thaw does not grant: upgrade the node's kernel to >= 5.9",
    )


def check_criu_version(binary: str | None, version: str | None, error: str | None) -> Line:
    if binary is None or version is None:
        return fail(
            "criu",
            error or "not found",
            "use Thaw's image (/opt/thaw/bin/criu) or set THAW_CRIU / --criu to a CRIU >= 4.0",
        )
    if _version(version)[:2] < MIN_CRIU:
        return fail(
            "criu",
            f"{binary}: version {version}",
            f"CRIU {version} is older than Thaw supports (>= 4.0): use the bundled /opt/thaw/bin/criu",
        )
    return ok("criu", f"{binary}: version {version}")


def check_criu_check(returncode: int | None, output: str, unprivileged: bool) -> Line:
    mode = " --unprivileged" if unprivileged else ""
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-3:])
    if returncode == 0:
        return ok("criu check", f"criu check{mode}: {'Looks good.' if 'Looks good' in output else tail}")
    if returncode is None:
        return fail(
            "criu check", f"criu check{mode}: {output}", "run it by hand on the node to see what hangs"
        )
    return fail(
        "criu check",
        f"criu check{mode} exited {returncode}: {tail}",
        "a kernel feature CRIU needs is missing or blocked (seccomp, LSM): see `criu check --all` on the "
        "node",
    )


def check_capabilities(cap_eff: int) -> Line:
    missing = [
        name
        for bit, name in ((CAP_CHECKPOINT_RESTORE, "CHECKPOINT_RESTORE"), (CAP_SYS_PTRACE, "SYS_PTRACE"))
        if not cap_eff >> bit & 1
    ]
    if not missing:
        return ok("capabilities", "CHECKPOINT_RESTORE and SYS_PTRACE in the effective set")
    return fail(
        "capabilities",
        f"missing {', '.join(missing)} (CapEff {cap_eff:#x})",
        "run as root on the node, or in a pod of a namespace labelled thaw.dev/restore=allowed "
        "(the webhook adds them to the restored container; they reach only root processes)",
    )


def check_ptrace_scope(scope: str | None) -> Line:
    if scope is None:
        return ok("ptrace", "no Yama LSM: ptrace limited by capabilities only")
    if scope.strip() == "3":
        return fail(
            "ptrace",
            "kernel.yama.ptrace_scope = 3: ptrace is off for everyone",
            "CRIU cannot seize a process tree: set kernel.yama.ptrace_scope to 1 or 2 (sysctl, reboot for 3)",
        )
    return ok("ptrace", f"kernel.yama.ptrace_scope = {scope.strip()} (SYS_PTRACE suffices)")


def check_driver(driver: str, gpus: int, product: str) -> Line:
    if driver in ("", "none"):
        return fail(
            "driver",
            "no NVIDIA driver found (NVML, nvidia-smi, /proc/driver/nvidia)",
            "run on a GPU node with the NVIDIA driver loaded (the agent runs on nvidia.com/gpu.present=true "
            "nodes)",
        )
    major = _version(driver)[:1]
    if major and major[0] < MIN_DRIVER:
        return fail(
            "driver",
            f"{driver} ({gpus}x {product})",
            f"the CUDA checkpoint API with restore needs driver >= {MIN_DRIVER}: upgrade the driver",
        )
    return ok("driver", f"{driver} ({gpus}x {product})")


def check_cuda_api(error: str | None) -> Line:
    if error is None:
        return ok(
            "CUDA checkpoint API",
            "libcuda.so.1 has cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock,GetState}; cuInit ok",
        )
    return fail(
        "CUDA checkpoint API",
        error,
        f"install NVIDIA driver >= {MIN_DRIVER} and make libcuda.so.1 visible (the NVIDIA container toolkit "
        "mounts it into GPU pods)",
    )


@dataclass(frozen=True)
class CacheFacts:
    path: Path
    exists: bool
    is_dir: bool = False
    is_symlink: bool = False
    uid: int = 0
    mode: int = 0o700
    fstype: str = ""
    free: int = 0
    total: int = 0
    error: str | None = None


def check_cache(c: CacheFacts, min_free: int, budget: int | None) -> list[Line]:
    name = "cache"
    if c.error is not None:
        return [
            fail(name, f"{c.path}: {c.error}", "check the hostPath (default /var/lib/thaw/cache) on the node")
        ]
    if not c.exists:
        return [
            warn(
                name,
                f"{c.path} does not exist yet",
                "nothing to do: the agent and thaw fetch create it (root, 0700); check again after a pass",
            )
        ]
    if c.is_symlink or not c.is_dir:
        return [
            fail(
                name,
                f"{c.path} is not a directory",
                "make it a root-owned directory (0700) on the node's disk",
            )
        ]
    out: list[Line] = []
    if c.uid != 0 or c.mode & 0o077:
        out.append(
            fail(
                "cache permissions",
                f"{c.path}: owner uid {c.uid}, mode {c.mode & 0o777:o}",
                f"snapshots hold process memory: chown root {c.path} && chmod 0700 {c.path}",
            )
        )
    else:
        out.append(ok("cache permissions", f"{c.path}: root, {c.mode & 0o777:o}"))
    if c.fstype in NOT_A_HOST_DISK:
        out.append(
            fail(
                "cache filesystem",
                f"{c.fstype}: {NOT_A_HOST_DISK[c.fstype]}",
                "mount the node's /var/lib/thaw/cache (hostPath) there",
            )
        )
    elif c.fstype == "tmpfs":
        out.append(
            ok("cache filesystem", "tmpfs: every snapshot is advertised as tier memory (lost at reboot)")
        )
    else:
        out.append(ok("cache filesystem", c.fstype or "unknown"))
    if c.free < min_free:
        out.append(
            fail(
                "cache free space",
                f"{c.free / GIB:.1f} GiB free of {c.total / GIB:.1f} GiB (want >= {min_free / GIB:.0f} GiB)",
                "free the disk, or lower --min-free for small models (a snapshot is about the server's host "
                "plus GPU memory)",
            )
        )
    else:
        out.append(ok("cache free space", f"{c.free / GIB:.1f} GiB free of {c.total / GIB:.1f} GiB"))
    if budget is not None and budget > c.total:
        out.append(
            warn(
                "cache budget",
                f"--budget {budget / GIB:.0f} GiB is more than the filesystem's {c.total / GIB:.1f} GiB",
                "lower the agent's --budget below the disk size (thaw fetch also stops at a full disk)",
            )
        )
    return out


def cache_facts(path: Path) -> CacheFacts:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return CacheFacts(path, exists=False)
    except OSError as exc:
        return CacheFacts(path, exists=False, error=exc.strerror or str(exc))
    from thaw.snapshot.cache import _fs_type as fs_type  # the cache's own reading of its mount

    if stat_mod.S_ISLNK(st.st_mode) or not stat_mod.S_ISDIR(st.st_mode):
        return CacheFacts(path, exists=True, is_dir=False, is_symlink=stat_mod.S_ISLNK(st.st_mode))
    vfs = os.statvfs(path)
    return CacheFacts(
        path,
        exists=True,
        is_dir=True,
        uid=st.st_uid,
        mode=st.st_mode,
        fstype=fs_type(path),
        free=vfs.f_bavail * vfs.f_frsize,
        total=vfs.f_blocks * vfs.f_frsize,
    )


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"did not finish within {timeout:.0f} s"
    except OSError as exc:
        return 127, str(exc)
    return out.returncode, (out.stdout + out.stderr)


def run_node(
    cache: Path,
    min_free: int = DEFAULT_MIN_FREE,
    budget: int | None = None,
    criu: str | None = None,
    runner: Callable[[list[str], float], tuple[int | None, str]] = _run,
) -> list[Line]:
    """Every node line, in order."""
    from thaw.runtime.criu import CriuError, criu_version, effective_caps, find_criu, mode_flags
    from thaw.snapshot.nodefacts import detect_gpu

    lines = [check_kernel(platform.release())]
    binary: str | None = None
    version: str | None = None
    error: str | None = None
    try:
        binary = find_criu({**os.environ, **({"THAW_CRIU": criu} if criu else {})})
        version = criu_version(binary)
    except (CriuError, OSError, subprocess.SubprocessError) as exc:
        error = str(exc)
    lines.append(check_criu_version(binary, version, error))
    try:
        cap_eff = effective_caps(Path("/proc/self/status").read_text())
    except OSError:
        cap_eff = 0
    if binary is not None and version is not None:
        flags = list(mode_flags(cap_eff))
        code, output = runner([binary, "check", *flags], CRIU_CHECK_TIMEOUT_S)
        lines.append(check_criu_check(code, output, bool(flags)))
    lines.append(check_capabilities(cap_eff))
    try:
        scope: str | None = Path("/proc/sys/kernel/yama/ptrace_scope").read_text()
    except OSError:
        scope = None
    lines.append(check_ptrace_scope(scope))
    gpu, driver = detect_gpu()
    lines.append(check_driver(driver, gpu["count"], gpu["product"]))
    from thaw.runtime.cuda import Cuda, CudaUnavailable

    try:
        Cuda.load()
        cuda_error = None
    except CudaUnavailable as exc:
        cuda_error = str(exc)
    lines.append(check_cuda_api(cuda_error))
    lines.extend(check_cache(cache_facts(cache), min_free, budget))
    return lines
