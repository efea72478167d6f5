"""The CUDA driver's checkpoint API through ctypes (``libcuda.so.1``), no separate binary.

Per process: lock (stop new CUDA work, wait for work in flight, with a timeout) -> checkpoint (GPU
memory copied into the process's host memory, device handles released, so CRIU can dump it) ->
restore (GPU memory back from host memory) -> unlock. A tree of several CUDA processes (tensor
parallel ranks) is handled together: lock all, checkpoint all; restore all, unlock all; so no rank
runs while another is frozen. Where libcuda is absent, ``Cuda.load()`` raises CudaUnavailable with
the reason, and callers treat the workload as having no CUDA state.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3
LIBCUDA = os.environ.get("THAW_LIBCUDA", "libcuda.so.1")


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
    # CUcheckpointCheckpointArgs / UnlockArgs: cuuint64_t reserved[8]. CUcheckpointRestoreArgs is
    # also 64 bytes (gpuPairs pointer, count, reserved); all zero means "same GPUs, no remapping".
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


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
        cuda = cls(lib)
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

    def restore(self, pid: int) -> None:
        args = _ZeroArgs()
        rc = int(self.lib.cuCheckpointProcessRestore(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessRestore", pid, rc)

    def unlock(self, pid: int) -> None:
        args = _ZeroArgs()
        rc = int(self.lib.cuCheckpointProcessUnlock(ctypes.c_int(pid), ctypes.byref(args)))
        self._check("cuCheckpointProcessUnlock", pid, rc)

    # Whole-tree operations, in the order issue 6 asks for: every rank frozen before any is
    # checkpointed, and on failure everything already done is undone in reverse.

    def cuda_pids(self, pids: Iterable[int]) -> list[int]:
        return [p for p in pids if self.state(p) is not None]

    def freeze(self, pids: list[int], timeout_ms: int) -> None:
        """Lock all, then checkpoint all. On failure, put back what was done, then raise."""
        locked: list[int] = []
        checkpointed: list[int] = []
        try:
            for pid in pids:
                self.lock(pid, timeout_ms)
                locked.append(pid)
            for pid in pids:
                self.checkpoint(pid)
                checkpointed.append(pid)
        except CudaError:
            for pid in reversed(checkpointed):
                _quietly(self.restore, pid)
            for pid in reversed(locked):
                _quietly(self.unlock, pid)
            raise

    def thaw(self, pids: list[int]) -> None:
        """Restore all, then unlock all (the mirror of freeze). Raises on the first failure."""
        for pid in pids:
            if self.state(pid) == ProcessState.CHECKPOINTED:
                self.restore(pid)
        for pid in pids:
            if self.state(pid) == ProcessState.LOCKED:
                self.unlock(pid)


def _quietly(fn: Callable[[int], None], pid: int) -> None:
    # Undoing after a failure: the first error is the one reported.
    with contextlib.suppress(CudaError):
        fn(pid)
