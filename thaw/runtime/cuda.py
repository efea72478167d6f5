"""The CUDA driver's checkpoint API through ctypes (``libcuda.so.1``), no separate binary.

Per process: lock (stop new CUDA work, wait for work in flight, with a timeout) -> checkpoint (GPU
memory copied into the process's host memory, device handles released, so CRIU can dump it) ->
restore (GPU memory back from host memory) -> unlock. A tree of several CUDA processes (tensor
parallel ranks) is handled together: lock all, checkpoint all; restore all, unlock all; so no rank
runs while another is frozen. Where libcuda is absent, ``Cuda.load()`` raises CudaUnavailable with
the reason, and callers treat the workload as having no CUDA state.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_NOT_READY = 600  # cuCheckpointProcessLock: the timeout passed with work still in flight
LIBCUDA = os.environ.get("THAW_LIBCUDA", "libcuda.so.1")

log = logging.getLogger("thaw.cuda")


class ProcessState(enum.IntEnum):
    """CUprocessState."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class CudaUnavailable(RuntimeError):
    """No usable driver checkpoint API here (no libcuda, driver too old, no GPU)."""


class CudaError(RuntimeError):
    """A checkpoint API call failed; the message names the call, the pid and the driver's error."""

    def __init__(self, call: str, pid: int, code: int, name: str) -> None:
        super().__init__(f"{call}(pid {pid}) failed: {name} ({code})")
        self.call, self.pid, self.code, self.name = call, pid, code, name


class _LockArgs(ctypes.Structure):
    # CUcheckpointLockArgs: unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7]
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class _ZeroArgs(ctypes.Structure):
    # CUcheckpointCheckpointArgs / UnlockArgs: cuuint64_t reserved[8].
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]  # CUuuid


class _GpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", _Uuid), ("newUuid", _Uuid)]  # CUcheckpointGpuPair


class _RestoreArgs(ctypes.Structure):
    # CUcheckpointRestoreArgs, 64 bytes: gpuPairs, gpuPairsCount, then reserved (zero). No pairs
    # means the GPUs the process had; pairs remap them (every checkpointed GPU must be listed).
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_ubyte * (64 - 8 - 4)),
    ]


def format_uuid(raw: bytes) -> str:
    """A CUuuid as nvidia-smi writes it: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx."""
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def parse_uuid(text: str) -> bytes:
    """The 16 bytes of a ``GPU-…`` UUID; ValueError for anything else."""
    h = text.removeprefix("GPU-").replace("-", "")
    raw = bytes.fromhex(h)
    if len(raw) != 16:
        raise ValueError(f"not a GPU UUID: {text!r}")
    return raw


def gpu_remap(old: list[str], new: list[str]) -> list[tuple[str, str]] | None:
    """UUID pairs restoring the GPUs of the checkpoint (``old``, in CUDA's order) onto this
    container's (``new``, same order), so rank i keeps computing on ordinal i. None when they are
    the same GPUs (the restore then passes no pairs) or when the checkpoint recorded none."""
    if not old or old == new:
        return None
    if len(old) != len(new):
        raise ValueError(f"the snapshot's {len(old)} GPUs cannot be mapped onto this container's {len(new)}")
    return list(zip(old, new, strict=True))


_SYMBOLS = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
)


@dataclass
class Cuda:
    lib: ctypes.CDLL
    # One rank after another instead of all at once: THAW_CUDA_SERIAL=true (a fallback should a
    # driver ever mishandle concurrent checkpoint calls; 580 handles them, docs/tensor-parallel.md).
    serial: bool = False

    @classmethod
    def load(cls, path: str = LIBCUDA) -> Cuda:
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise CudaUnavailable(f"cannot load {path}: {exc}") from exc
        missing = [s for s in _SYMBOLS if not hasattr(lib, s)]
        if missing:
            raise CudaUnavailable(
                f"{path} lacks {', '.join(missing)} (the checkpoint API needs driver 570 or newer)"
            )
        cuda = cls(lib, serial=os.environ.get("THAW_CUDA_SERIAL", "").lower() in ("1", "true", "yes"))
        rc = int(lib.cuInit(0))
        if rc != CUDA_SUCCESS:
            raise CudaUnavailable(f"cuInit failed: {cuda.error_name(rc)} ({rc})")
        return cuda

    def error_name(self, code: int) -> str:
        out = ctypes.c_char_p()
        if int(self.lib.cuGetErrorName(code, ctypes.byref(out))) == CUDA_SUCCESS and out.value:
            return out.value.decode()
        return f"CUDA error {code}"

    def _check(self, call: str, pid: int, rc: int) -> None:
        if rc != CUDA_SUCCESS:
            raise CudaError(call, pid, rc, self.error_name(rc))

    def state(self, pid: int) -> ProcessState | None:
        """The process's CUDA state, or None when it has no CUDA state (or is not a process)."""
        st = ctypes.c_int(-1)
        rc = int(self.lib.cuCheckpointProcessGetState(ctypes.c_int(pid), ctypes.byref(st)))
        if rc != CUDA_SUCCESS:
            return None
        try:
            return ProcessState(st.value)
        except ValueError:
            return None

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        rc = int(self.lib.cuCheckpointProcessLock(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessLock", pid, rc)

    def checkpoint(self, pid: int) -> None:
        args = _ZeroArgs()
        rc = int(self.lib.cuCheckpointProcessCheckpoint(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessCheckpoint", pid, rc)

    def restore(self, pid: int, pairs: list[tuple[str, str]] | None = None) -> None:
        args = _RestoreArgs()
        if pairs:
            array = (_GpuPair * len(pairs))()
            for i, (old, new) in enumerate(pairs):
                array[i].oldUuid.bytes[:] = list(parse_uuid(old))
                array[i].newUuid.bytes[:] = list(parse_uuid(new))
            args.gpuPairs = ctypes.cast(array, ctypes.POINTER(_GpuPair))
            args.gpuPairsCount = len(pairs)
        rc = int(self.lib.cuCheckpointProcessRestore(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessRestore", pid, rc)

    def gpu_uuids(self) -> list[str]:
        """The UUIDs of the GPUs this process sees, in CUDA's device order."""
        count = ctypes.c_int(0)
        self._check("cuDeviceGetCount", 0, int(self.lib.cuDeviceGetCount(ctypes.byref(count))))
        out = []
        get_uuid = getattr(self.lib, "cuDeviceGetUuid_v2", None) or self.lib.cuDeviceGetUuid
        for ordinal in range(count.value):
            dev = ctypes.c_int(0)
            self._check("cuDeviceGet", 0, int(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal)))
            uuid = _Uuid()
            self._check("cuDeviceGetUuid", 0, int(get_uuid(ctypes.byref(uuid), dev)))
            out.append(format_uuid(bytes(uuid.bytes)))
        return out

    def restore_thread(self, pid: int) -> int | None:
        """The thread of ``pid`` on which the driver restores its GPU state
        (``cuCheckpointProcessGetRestoreThreadId``), or None (no such call in this driver, or no CUDA
        state): what ``--ready-gate stopped`` lets run alone (thaw.runtime.stopped)."""
        fn = getattr(self.lib, "cuCheckpointProcessGetRestoreThreadId", None)
        if fn is None:
            return None
        tid = ctypes.c_int(0)
        if int(fn(ctypes.c_int(pid), ctypes.byref(tid))) != CUDA_SUCCESS or tid.value <= 0:
            return None
        return tid.value

    def unlock(self, pid: int) -> None:
        args = _ZeroArgs()
        rc = int(self.lib.cuCheckpointProcessUnlock(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessUnlock", pid, rc)

    # Whole-tree operations, in the order issue 6 asks for: every rank frozen before any is
    # checkpointed, and on failure everything already done is undone. Within a step (lock,
    # checkpoint, restore, unlock) the ranks go at once, one thread each: the driver does each
    # process's copy in that process, on its own GPU, so N ranks take about one rank's time, not N
    # times it (ctypes releases the GIL).

    def cuda_pids(self, pids: Iterable[int]) -> list[int]:
        return [p for p in pids if self.state(p) is not None]

    def freeze_retrying(self, pids: list[int], timeout_ms: int, *, attempts: int, pause_s: float) -> int:
        """``freeze``, tried again after a lock timeout; returns the attempts it took.

        Ranks locked while a request is being served can wait on each other: a locked rank launches
        no more work, so a collective that another rank already started never finishes and that
        rank's lock times out (CUDA_ERROR_NOT_READY; seen on 4x H200 when the checkpoint began
        during the first request). ``freeze`` then unlocks them all, the collective completes, and
        a later attempt finds the ranks between kernels. Other failures are not retried.
        """
        for attempt in range(1, attempts):
            try:
                self.freeze(pids, timeout_ms)
                return attempt
            except CudaError as exc:
                if exc.code != CUDA_ERROR_NOT_READY:
                    raise
                log.warning("lock timed out (%s); all ranks unlocked, trying again in %.0f s", exc, pause_s)
                time.sleep(pause_s)
        self.freeze(pids, timeout_ms)  # the last attempt: its failure is the one reported
        return attempts

    def freeze(self, pids: list[int], timeout_ms: int) -> None:
        """Lock all, then checkpoint all. On failure, put back what was done, then raise."""
        locked, err = self._each(lambda pid: self.lock(pid, timeout_ms), pids)
        checkpointed: list[int] = []
        if err is None:
            checkpointed, err = self._each(self.checkpoint, pids)
        if err is not None:
            self._each(self.restore, checkpointed)
            self._each(self.unlock, locked)
            raise err

    def thaw(self, pids: list[int], pairs: list[tuple[str, str]] | None = None) -> None:
        """Restore all (onto other GPUs where ``pairs`` says so), then unlock all (the mirror of
        freeze). Raises the first failure."""
        checkpointed = [p for p in pids if self.state(p) == ProcessState.CHECKPOINTED]
        _, err = self._each(lambda pid: self.restore(pid, pairs), checkpointed)
        if err is None:
            _, err = self._each(self.unlock, [p for p in pids if self.state(p) == ProcessState.LOCKED])
        if err is not None:
            raise err

    def _each(self, step: Callable[[int], None], pids: list[int]) -> tuple[list[int], CudaError | None]:
        """Run ``step`` for every pid (at once unless ``serial``), waiting for all. Returns the pids
        it succeeded for and the first CudaError in pid order (other exceptions propagate)."""
        if self.serial or len(pids) < 2:
            results = [_attempt(step, pid) for pid in pids]
        else:
            with ThreadPoolExecutor(max_workers=len(pids), thread_name_prefix="thaw-cuda") as pool:
                results = list(pool.map(lambda pid: _attempt(step, pid), pids))
        done = [pid for pid, exc in zip(pids, results, strict=True) if exc is None]
        return done, next((exc for exc in results if exc is not None), None)


def _attempt(step: Callable[[int], None], pid: int) -> CudaError | None:
    try:
        step(pid)
    except CudaError as exc:
        return exc
    return None
