"""PID 1 duties of ``thaw exec``: forward signals to the workload, reap every child (it is also a
child subreaper where it is not PID 1, as in tests), and start the workload.

PIDs. CRIU restores every process with its old PID, so those PIDs must be free in the new container.
In a new container only ``thaw exec`` (PID 1) and CRIU (a few PIDs) run before the restore, so the
workload is started at a high PID at checkpoint time (``--pid-floor``, default 4096), and so are the
processes it starts later: what moves is the namespace's PID counter, not just the first PID.

- ``/proc/sys/kernel/ns_last_pid`` where writable (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and
  a writable /proc/sys): one write.
- Else (containers mount /proc/sys read-only) by creating and reaping short-lived children until the
  counter passes the floor. Each child is a ``clone(CLONE_VM | CLONE_VFORK)`` that runs ``_exit`` on
  a small stack of its own: no page tables are copied and no Python runs in it, so 4,095 of them
  take ~0.06 s where ``os.fork`` of ``thaw exec`` took ~6 s (measured on the 2-core CI machine,
  docs/benchmarks.md, "CPU: the runtime on a 2-core machine"). It needs no capability. ``os.fork``
  stays as the fallback where ``clone`` cannot be called through ctypes.
- Not ``clone3`` with ``set_tid``: it gives the new process exactly the PID asked for, but does not
  move the counter (the kernel allocates it with ``idr_alloc``, not the cyclic allocator), so a child
  placed at floor-1 is followed by a low PID again, and a workload placed at the floor would start
  its own workers at low PIDs (measured: clone3 at 6000, then ``fork`` gave 42). It also needs
  CHECKPOINT_RESTORE, and container runtimes' default seccomp profiles answer ``clone3`` with ENOSYS.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from thaw.errors import UsageError
from thaw.runtime import criu

log = logging.getLogger("thaw.exec")

PR_SET_CHILD_SUBREAPER = 36
DEFAULT_PID_FLOOR = 4096
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def exit_note(code: int | None) -> str:
    """ " (exit status N, signal NAME)" for a root that has exited, "" otherwise (pure): a restored
    tree that dies at once is told apart from one that never answered."""
    if code is None:
        return ""
    if code > 128:
        try:
            return f" (exit status {code}: {signal.Signals(code - 128).name})"
        except ValueError:
            pass
    return f" (exit status {code})"


class Supervisor:
    """Forwards signals to the workload's root process and reaps every child."""

    def __init__(self) -> None:
        self.root: int | None = None
        self.status: int | None = None
        self.signalled: int | None = None

    def install(self) -> None:
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._forward)

    def _forward(self, signum: int, _frame: object) -> None:
        self.signalled = signum
        if self.root is not None and self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.root, signum)

    def adopt(self, pid: int) -> None:
        self.root, self.status = pid, None

    def _reaped(self, pid: int, status: int) -> None:
        if pid == self.root:
            self.status = exit_code(status)

    def reap_nohang(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reaped(pid, status)

    def alive(self) -> bool:
        self.reap_nohang()
        if self.root is None:
            return False
        if self.status is not None:
            return False
        # A restored root is our child only once CRIU has exited and it was re-parented to us.
        return os.path.exists(f"/proc/{self.root}")

    def wait(self) -> int:
        """Reap until the root exits; its exit code (128+N for signal N)."""
        while self.status is None:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                # The root is not (or no longer) our child: nothing left to wait for.
                return self.status if self.status is not None else 1
            self._reaped(pid, status)
        return self.status

    def kill_tree(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while criu.pids_in_use(pids) and time.monotonic() < deadline:
            self.reap_nohang()
            time.sleep(0.02)
        self.reap_nohang()
        self.root, self.status = None, None


def last_pid() -> int:
    try:
        return int(Path("/proc/sys/kernel/ns_last_pid").read_text().strip())
    except (OSError, ValueError):
        return 0


CLONE_VM = 0x100
CLONE_VFORK = 0x4000
_STACK_BYTES = 64 * 1024


class _VforkExit:
    """``clone(_exit, stack, CLONE_VM | CLONE_VFORK | SIGCHLD, 0)``: a child that shares our memory,
    runs only libc's ``_exit(0)`` on its own stack, and that we are suspended for until it has
    exited: the cheapest way to take one PID from the counter (module doc)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._clone = libc.clone
        self._clone.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        self._clone.restype = ctypes.c_int
        self._exit = ctypes.cast(libc._exit, ctypes.c_void_p)
        self._stack = ctypes.create_string_buffer(_STACK_BYTES)
        # The stack grows down: its top, 16-byte aligned as the ABI wants.
        self._top = ctypes.c_void_p((ctypes.addressof(self._stack) + _STACK_BYTES - 64) & ~0xF)

    def __call__(self) -> int:
        pid = int(self._clone(self._exit, self._top, CLONE_VM | CLONE_VFORK | signal.SIGCHLD, None))
        if pid < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        os.waitpid(pid, 0)
        return pid


def _fork_exit() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def take_pids_until(floor: int, make: Callable[[], int]) -> int:
    """Create and reap children with ``make`` until one gets a PID at or above ``floor - 1`` (so the
    next is at least ``floor``); stops on wrap-around. Returns the last child's PID."""
    prev = 0
    while True:
        pid = make()
        if pid >= floor - 1 or pid < prev:
            return pid
        prev = pid


def advance_pid_counter(floor: int) -> str:
    """Make the next PID at least ``floor``; say how (or why not) for the log (module doc)."""
    if last_pid() >= floor:
        return "already past"
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(floor - 1))
        return "ns_last_pid"
    except OSError:
        pass
    try:
        make: Callable[[], int] = _VforkExit()
        how = "vfork children"
        pid = take_pids_until(floor, make)
    except (OSError, AttributeError) as exc:
        log.debug("clone(CLONE_VM|CLONE_VFORK) unavailable (%s): forking instead", exc)
        how = "forked children"
        pid = take_pids_until(floor, _fork_exit)
    return f"{how} up to {pid}"


def spawn(cmd: list[str], pid_floor: int | None) -> subprocess.Popen[bytes]:
    if pid_floor:
        how = advance_pid_counter(pid_floor)
        log.debug("PID counter moved to %d (%s)", pid_floor, how)
    try:
        # Own session: the dumped tree then has no session or terminal outside itself (no
        # --shell-job). stdin from /dev/null, which every container has; stdout/stderr are ours.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError as exc:
        raise UsageError(f"cannot run {cmd[0]!r}: {exc.strerror or exc}") from exc
    if pid_floor and proc.pid < pid_floor:
        log.warning(
            "workload got PID %d below the floor %d: a restore may find it taken", proc.pid, pid_floor
        )
    return proc
