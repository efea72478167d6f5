"""Running CRIU for ``thaw exec``: which binary, which flags and why, the process tree, and errors that
say what went wrong with the relevant lines of CRIU's log.

Flags, and why (DESIGN.md; issue 5):

- ``--leave-running`` on dump: the server keeps serving after its snapshot is taken.
- ``--tcp-close`` on dump and restore: established connections (clients, probes) are not dumped and
  come back closed, so a snapshot taken while a client is connected still restores in a new pod's
  network namespace, where those connections could never exist. Listening sockets are restored.
  ``tcp_established=True`` (``--tcp-established``) is for trees whose connections are between their
  own processes (NCCL bootstrap between tensor-parallel ranks), which must come back open.
- ``--skip-in-flight``: half-open connections in a listener's queue are dropped, not fatal.
- ``--network-lock skip`` where neither iptables nor nft exists (slim images, these CI machines):
  with established connections closed or kept inside the tree, there is nothing to lock.
- ``--ghost-limit``: deleted-but-open files (Python's and NCCL's temporary files in /dev/shm, ~34 MB
  for NCCL) are carried in the image up to this size; CRIU's default of 1 MiB refuses them.
- ``--file-locks``: servers hold flock()s (compile caches); without it CRIU refuses to dump.
- ``--manage-cgroups=ignore``: the restored tree joins the new container's cgroup (its limits), not
  the one of the pod that took the snapshot.
- no ``--shell-job``: ``thaw exec`` starts the workload in its own session, so the tree has no
  terminal or session outside itself.
- ``--unprivileged`` where ``thaw exec`` lacks CAP_SYS_ADMIN (a pod gets CHECKPOINT_RESTORE and
  SYS_PTRACE, not SYS_ADMIN): CRIU then skips the start-up probes that create namespaces (which fail
  with EPERM: measured, dump and restore both), the forced socket buffer sizes (NET_ADMIN) and the
  time namespace's clock offsets (SYS_TIME). Measured in a container-like setup (root, the runtime's
  default capabilities plus CHECKPOINT_RESTORE and SYS_PTRACE): dump and restore work; without
  CHECKPOINT_RESTORE the dump is refused ("Effective capability 40 missing").
- ``--inherit-fd fd[N]:RESOURCE`` on restore: the workload's stdout/stderr were the old container's
  (its log pipes in a pod); they are rebound to the new container's, so logs keep flowing after a
  restore, whatever each was (:func:`stdio_resource`): a pipe or socket (``pipe:[INODE]``), a file
  (``path/to/file``, no leading slash: CRIU then takes our descriptor instead of reopening the file,
  whose size it would check: "bad size" for a log file that grew), ``/dev/null`` (a file to CRIU),
  a terminal (``tty[RDEV:DEV]``, which the dump marks ``--external``: no ``--shell-job``), or a file
  opened outside the container's mount namespace (``file[MNT:INO]``, also ``--external``: CRIU
  cannot find its mount).
- ``--action-script`` on dump: CRIU runs it at post-dump while the tree is still frozen; it copies
  the pod files into the images (thaw/runtime/podfiles.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

GHOST_LIMIT = 256 * 1024 * 1024
LOG_TAIL_LINES = 12
REPO_CRIU = Path(__file__).resolve().parents[2] / ".tools" / "criu" / "bin" / "criu"
# The fast-restore build (scripts/build-criu-fast): beside the stock binary as ``criu-fast`` in the
# runtime bundle (scripts/build-runtime), in .tools/criu-fast in a checkout.
FAST_NAME = "criu-fast"
REPO_CRIU_FAST = Path(__file__).resolve().parents[2] / ".tools" / "criu-fast" / "bin" / "criu"


class CriuError(RuntimeError):
    """CRIU failed; the message carries the relevant tail of its log."""


class CriuMissing(CriuError):
    """No CRIU binary found."""


class CriuTimeout(CriuError):
    """CRIU ran past its time (a damaged image can loop the restorer)."""


def find_criu(env: dict[str, str] | None = None) -> str:
    """THAW_CRIU, else ``criu`` on PATH, else the repository's ``.tools/criu/bin/criu``."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    explicit = env.get("THAW_CRIU")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise CriuMissing(f"THAW_CRIU={explicit} is not an executable file")
    on_path = shutil.which("criu", path=env.get("PATH"))
    if on_path:
        return on_path
    if os.access(REPO_CRIU, os.X_OK):
        return str(REPO_CRIU)
    raise CriuMissing("criu not found (set THAW_CRIU, put criu on PATH, or run `make criu`)")


def criu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r"Version:\s*(\S+)", out.stdout)
    if out.returncode != 0 or not m:
        raise CriuError(f"{binary} --version failed: {(out.stderr or out.stdout).strip()[:200]}")
    return m.group(1)


@dataclass(frozen=True)
class RestoreCriu:
    """The CRIU that restores: ``kind`` "fast" (scripts/criu/parallel-restore.patch) or "stock";
    ``note`` says why stock where a fast one was looked for."""

    binary: str
    kind: str
    note: str = ""

    def record(self) -> dict[str, str]:
        """As the outcome's ``criu`` records it (the note only when there is one)."""
        return {"kind": self.kind, "binary": self.binary, **({"note": self.note} if self.note else {})}


def fast_candidates(stock: str, env: dict[str, str]) -> list[str]:
    """Where a fast-restore CRIU may be, in order (pure): THAW_CRIU_FAST alone when set; else
    ``criu-fast`` beside the stock binary (the bundle's bin/), and the checkout's .tools/criu-fast
    when the stock binary is the checkout's own (an explicit other THAW_CRIU keeps its own pair)."""
    explicit = env.get("THAW_CRIU_FAST")
    if explicit:
        return [explicit]
    out = [os.path.join(os.path.dirname(stock), FAST_NAME)]
    if os.path.realpath(stock) == os.path.realpath(REPO_CRIU):
        out.append(str(REPO_CRIU_FAST))
    return out


def restore_criu(stock: str, *, force_stock: bool = False, env: dict[str, str] | None = None) -> RestoreCriu:
    """The fast-restore CRIU when present and answering ``--version``, else ``stock`` (and why).
    ``force_stock`` (``thaw exec --criu-stock``): stock, for side-by-side runs."""
    env = dict(os.environ) if env is None else env
    if force_stock:
        return RestoreCriu(stock, "stock", "stock asked for (--criu-stock)")
    for candidate in fast_candidates(stock, env):
        if not os.access(candidate, os.X_OK):
            if env.get("THAW_CRIU_FAST"):
                return RestoreCriu(stock, "stock", f"THAW_CRIU_FAST={candidate} is not an executable file")
            continue
        try:
            criu_version(candidate)
        except (CriuError, OSError, subprocess.SubprocessError) as exc:
            return RestoreCriu(stock, "stock", f"fast CRIU {candidate} does not run: {exc}")
        return RestoreCriu(candidate, "fast")
    return RestoreCriu(stock, "stock", "no fast CRIU")


CAP_SYS_ADMIN = 21


def effective_caps(status_text: str) -> int:
    """CapEff from the text of /proc/PID/status (pure); 0 when absent."""
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status_text, re.MULTILINE)
    return int(m.group(1), 16) if m else 0


def mode_flags(cap_eff: int) -> tuple[str, ...]:
    """``--unprivileged`` unless we hold CAP_SYS_ADMIN (see the module doc)."""
    return () if cap_eff >> CAP_SYS_ADMIN & 1 else ("--unprivileged",)


def detect_mode_flags() -> tuple[str, ...]:
    try:
        return mode_flags(effective_caps(Path("/proc/self/status").read_text()))
    except OSError:
        return ()


def network_lock_method(have_iptables: bool, have_nft: bool) -> str:
    """iptables where present (CRIU's default), else nftables, else skip (see module doc)."""
    if have_iptables:
        return "iptables"
    if have_nft:
        return "nftables"
    return "skip"


def detect_network_lock() -> str:
    return network_lock_method(shutil.which("iptables-restore") is not None, shutil.which("nft") is not None)


@dataclass(frozen=True)
class CriuOptions:
    network_lock: str = "skip"
    tcp_established: bool = False  # keep connections inside the tree open (NCCL); else close them
    ghost_limit: int = GHOST_LIMIT
    verbosity: int = 4
    extra: tuple[str, ...] = field(default_factory=tuple)


def _common(opts: CriuOptions, images: Path, work: Path, log: str) -> list[str]:
    args = [
        "-D",
        str(images),
        "-W",
        str(work),
        "-o",
        log,
        f"-v{opts.verbosity}",
        "--file-locks",
        "--manage-cgroups=ignore",
        "--skip-in-flight",
    ]
    args.append("--tcp-established" if opts.tcp_established else "--tcp-close")
    return args


def dump_args(
    binary: str,
    root_pid: int,
    images: Path,
    work: Path,
    opts: CriuOptions,
    *,
    leave_running: bool = True,
    action_script: Path | None = None,
    externals: Sequence[str] = (),
) -> list[str]:
    args = [binary, "dump", "-t", str(root_pid), *_common(opts, images, work, "dump.log")]
    # Dump only: a restore uses the method recorded in the images (CRIU ignores the flag there).
    args += ["--network-lock", opts.network_lock]
    args += ["--ghost-limit", str(opts.ghost_limit)]
    if leave_running:
        args.append("--leave-running")
    if action_script is not None:
        args += ["--action-script", str(action_script)]
    for resource in externals:
        args += ["--external", resource]
    return [*args, *opts.extra]


def stdio_resource(
    target: str, *, is_tty: bool, rdev: int, dev: int, ino: int, mnt_id: int, mnt_here: bool
) -> str:
    """How CRIU names the file behind one of the workload's stdout/stderr, for ``--inherit-fd``;
    "" when it cannot be inherited (pure, module doc). ``mnt_here``: its mount (``mnt_id``) is in our
    mount namespace. One that is not (a file or /dev/null opened by whoever started ``thaw exec``,
    outside the container) can only be dumped as an external file, ``file[MNT:INO]``, whose size CRIU
    still checks at restore unless it was opened for appending."""
    if is_tty:
        return f"tty[{rdev:x}:{dev:x}]"
    if target.startswith(("pipe:[", "socket:[")):
        return target
    if not target.startswith("/") or len(target) == 1 or target.endswith(" (deleted)"):
        return ""
    if mnt_here:
        return target[1:]
    return f"file[{mnt_id:x}:{ino:x}]"


def _fd_mnt_id(fd: int) -> int:
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    return -1


def stdio_resources() -> dict[str, str]:
    """:func:`stdio_resource` of our own fds 1 and 2 (the workload inherits them), by fd number."""
    try:
        here = {
            int(line.split()[0]) for line in Path("/proc/self/mountinfo").read_text().splitlines() if line
        }
    except (OSError, ValueError):
        here = set()
    out: dict[str, str] = {}
    for fd in (1, 2):
        try:
            st, mnt = os.fstat(fd), _fd_mnt_id(fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
        except (OSError, ValueError):
            continue
        name = stdio_resource(
            target,
            is_tty=os.isatty(fd),
            rdev=st.st_rdev,
            dev=st.st_dev,
            ino=st.st_ino,
            mnt_id=mnt,
            mnt_here=mnt in here,
        )
        if name:
            out[str(fd)] = name
    return out


def stdio_paths(stdio: dict[str, str]) -> list[str]:
    """The files among ``stdio`` (stdio_resources) that CRIU takes by path: the pod files leave them
    to the new container's own stdout/stderr (pure)."""
    return sorted(
        {"/" + r for r in stdio.values() if not r.startswith(("pipe:[", "socket:[", "tty[", "file["))}
    )


def externals(stdio: dict[str, str]) -> list[str]:
    """What the dump must take as external (``--external``): the terminals and the files from outside
    the container among ``stdio`` (stdio_resources), pure."""
    return sorted({r for r in stdio.values() if r.startswith(("tty[", "file["))})


def restore_args(
    binary: str,
    images: Path,
    work: Path,
    opts: CriuOptions,
    *,
    pidfile: Path,
    inherit: Sequence[tuple[int, str]] = (),
) -> list[str]:
    # -v3 for restores: at -v4 a restorer stuck on a damaged image logs millions of lines.
    args = [
        binary,
        "restore",
        *_common(replace(opts, verbosity=min(opts.verbosity, 3)), images, work, "restore.log"),
    ]
    # Detached: CRIU exits once the tree runs; the tree's root is re-parented to the nearest child
    # subreaper, which is thaw exec (PID 1 in a container, PR_SET_CHILD_SUBREAPER elsewhere).
    args += ["--restore-detached", "--pidfile", str(pidfile)]
    for fd, name in inherit:
        args += ["--inherit-fd", f"fd[{fd}]:{name}"]
    return [*args, *opts.extra]


_ERROR_LINE = re.compile(r"\b(Error|error|Err|FAIL|fail|Can't|Unable|unsupported|refuse)", re.ASCII)


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The lines that explain a failure: CRIU's error lines (last ``lines`` of them), else the tail."""
    all_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in all_lines if _ERROR_LINE.search(ln)]
    chosen = errors[-lines:] if errors else all_lines[-lines:]
    return " | ".join(chosen)


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run(
    args: list[str], log: Path, timeout: float, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """Run CRIU; raise CriuError with the log's relevant tail when it fails."""
    try:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            pass_fds=tuple(pass_fds),
        )
    except subprocess.TimeoutExpired as exc:
        raise CriuTimeout(
            f"criu {args[1]} timed out after {timeout:.0f}s; {log_tail(_read_log(log))}"
        ) from exc
    except OSError as exc:
        raise CriuMissing(f"cannot run {args[0]}: {exc}") from exc
    if proc.returncode != 0:
        # Before its log file is open (e.g. a missing capability) CRIU writes to stdout/stderr.
        detail = log_tail(_read_log(log)) or log_tail(f"{proc.stderr}\n{proc.stdout}")
        raise CriuError(f"criu {args[1]} exited {proc.returncode} (log {log}): {detail}")
    return proc


# --- the process tree -------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents before children."""
    order, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        if not os.path.exists(f"/proc/{pid}"):
            continue
        order.append(pid)
        todo += children(pid)
    return order


def fd_targets(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
    return out


def undumpable_reasons(fds_by_pid: dict[int, dict[int, str]]) -> list[str]:
    """What CRIU cannot dump, said plainly, before CRIU says it cryptically (pure)."""
    reasons: list[str] = []
    for pid, fds in sorted(fds_by_pid.items()):
        for fd, target in sorted(fds.items()):
            if target == "anon_inode:[io_uring]":
                reasons.append(
                    f"process {pid} has an io_uring instance (fd {fd}): CRIU cannot dump io_uring;"
                    " run the server without io_uring (e.g. a non-io_uring event loop)"
                )
    return reasons


def device_fds(fds_by_pid: dict[int, dict[int, str]], prefix: str = "/dev/nvidia") -> list[str]:
    """GPU device files still open (after a CUDA checkpoint there should be none): logged as a
    warning, since CRIU reports them itself if it cannot handle them (pure)."""
    return [
        f"process {pid} fd {fd} -> {t}"
        for pid, fds in sorted(fds_by_pid.items())
        for fd, t in sorted(fds.items())
        if t.startswith(prefix)
    ]


def pids_in_use(pids: Sequence[int]) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


def wait_pids_free(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` exists (an old tree's zombies being reaped); return those left."""
    deadline = time.monotonic() + timeout
    while True:
        busy = pids_in_use(pids)
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.05)


def pid_file_busy(log_text: str) -> bool:
    """CRIU's "Can't fork for PID: File exists": a PID of the tree was still taken."""
    return "File exists" in log_text and ("fork" in log_text or "set_tid" in log_text)
