"""``--ready-gate stopped`` (issue 10.4): the GPU state of a tree that CRIU restored stopped
(``--leave-stopped``) is put back before any of its own threads runs.

The CUDA driver restores a process's GPU memory from inside that process, on a dedicated restore
thread (``cuCheckpointProcessGetRestoreThreadId``), so a tree stopped whole would never be restored.
As CRIU's CUDA plugin does during ``criu restore``, only that thread is let run: ``thaw exec``
seizes it with ptrace (the rest of its process stays in its group stop), resumes it, runs the CUDA
restore and unlock, interrupts and detaches it (it rejoins the group stop), and then sends SIGCONT to
every process of the tree. The server cannot answer a probe or a client before its GPU memory is
back. Without the driver call (older drivers, no CUDA), :class:`NoRestoreThread` says so and the
caller lets the tree run first (``file``'s way).

ptrace calls must all come from one thread (the tracer is a thread): the caller's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("thaw.exec")

PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
WALL = 0x40000000  # __WALL: wait for threads too
STOP_WAIT_S = 5.0


class NoRestoreThread(RuntimeError):
    """A CUDA process whose restore thread the driver does not name."""


def _ptrace(request: int, tid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    if libc.ptrace(request, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request:#x}, thread {tid}): {os.strerror(err)}")


def _wait_stop(tid: int, timeout: float = STOP_WAIT_S) -> None:
    """Wait (bounded) until the traced thread ``tid`` reports a stop."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(tid, os.WNOHANG | WALL)
        if pid == tid and os.WIFSTOPPED(status):
            return
        if pid == tid:
            raise OSError(f"thread {tid} ended while traced (status {status:#x})")
        if time.monotonic() > deadline:
            raise OSError(f"thread {tid} did not stop within {timeout:.0f} s")
        time.sleep(0.005)


@contextlib.contextmanager
def running_alone(tids: Iterable[int]) -> Iterator[None]:
    """While the block runs, the threads ``tids`` run and the rest of their (stopped) processes
    stays stopped; afterwards they are stopped again with them."""
    seized: list[int] = []
    try:
        for tid in tids:
            _ptrace(PTRACE_SEIZE, tid)
            seized.append(tid)
            _wait_stop(tid)  # seizing a thread in a group stop puts it in a ptrace stop
            _ptrace(PTRACE_CONT, tid)
        yield
    finally:
        for tid in seized:
            with contextlib.suppress(OSError):
                _ptrace(PTRACE_INTERRUPT, tid)
                _wait_stop(tid)
            with contextlib.suppress(OSError):
                _ptrace(PTRACE_DETACH, tid)  # back into its process's group stop


def restore_threads(cuda: Any, pids: list[int]) -> dict[int, int]:
    """Each CUDA process's restore thread; NoRestoreThread naming those the driver does not know."""
    tids = {pid: cuda.restore_thread(pid) for pid in pids}
    missing = [pid for pid, tid in tids.items() if tid is None]
    if missing:
        raise NoRestoreThread(f"the CUDA driver names no restore thread for processes {missing}")
    return {pid: int(tid) for pid, tid in tids.items()}


def continue_tree(pids: Iterable[int]) -> None:
    """SIGCONT every process of the tree (CRIU's --leave-stopped left each in a group stop)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
