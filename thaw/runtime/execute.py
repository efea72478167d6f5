"""``thaw exec -- CMD...``: the workload container's command (DESIGN.md, "The pod's life" 4 and 5).

As PID 1 of the container it forwards signals to the workload, reaps every child (it is also a child
subreaper where it is not PID 1, as in tests) and exits with the workload's status.

Plan ``restore``: CRIU restores the process tree, then the CUDA driver puts GPU memory back
(restore, then unlock, for every CUDA process of the tree), then, if ``--ready`` is given, the
restored server must answer before it is accepted. Any failure kills what was restored and runs CMD
(a cold start): a restore never crash-loops a pod. Why is logged and written to the outcome file
(``outcome.json`` beside the plan unless ``--outcome``), with the relevant lines of CRIU's log.

Plan ``cold`` with ``--checkpoint on-ready``: start CMD, wait until ``--ready`` answers, lock and
checkpoint CUDA in every process that has CUDA state, dump the tree with CRIU leaving it running,
restore and unlock CUDA, then publish the images (signed) to the store and keep the node's copy in
its cache. A failed checkpoint never stops the server; it is logged and recorded.

PIDs. CRIU restores every process with its old PID, so those PIDs must be free in the new container.
In a new container only ``thaw exec`` (PID 1) and CRIU (a few PIDs) run before the restore, so the
workload is started at a high PID at checkpoint time (``--pid-floor``, default 4096): the PID
counter is moved there through ``/proc/sys/kernel/ns_last_pid`` where writable, else by forking and
reaping short-lived children until it gets there (containers often mount /proc/sys read-only). The
restore waits briefly for PIDs still held by a dead tree's zombies ("Can't fork for PID: File
exists") and retries CRIU once more if it still hits one.

Snapshot metadata (``thaw-exec.json`` in the images, covered by the signed manifest): format, root
PID, all PIDs, CUDA PIDs (in lock order), the command, the names of the workload's stdout and
stderr at checkpoint time (rebound to the new container's on restore), and the GPU layout (issue 6):
how many GPUs the container saw and, for each CUDA process in lock order, its rank (``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` from its environment) and the ordinals of the GPUs it had open (the
index of ``/dev/nvidiaN`` among the container's GPU device files, which is the order CUDA numbers
them without ``CUDA_VISIBLE_DEVICES``). The CUDA driver restores each process onto the same
ordinals, so a restore needs a container that sees exactly as many GPUs; otherwise it is refused
before CRIU runs and the whole workload cold-starts.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.hooks import HookError, resolve_pair
from thaw.contract.manifest import EXEC_META_NAME
from thaw.contract.plan import Plan, read_plan
from thaw.errors import UsageError
from thaw.runtime import criu, hooks
from thaw.runtime.ready import ReadySpec, ReadySpecError, parse_ready, wait_ready

log = logging.getLogger("thaw.exec")

META_NAME = EXEC_META_NAME  # signed with the snapshot: the manifest lists it, and copies its GPU layout
META_FORMAT = 1
PR_SET_CHILD_SUBREAPER = 36
DEFAULT_PID_FLOOR = 4096
# Locking waits only for kernels already launched (milliseconds), unless ranks wait on each other in
# a collective (Cuda.freeze_retrying): then it times out, every rank is unlocked and it is tried again.
CUDA_LOCK_TIMEOUT_MS = 10_000
CUDA_LOCK_ATTEMPTS = 6
CUDA_LOCK_PAUSE_S = 5.0
CRIU_DUMP_TIMEOUT_S = 1800.0
# A restore gets this long plus its image at a slow disk's rate: a damaged image can send CRIU's
# restorer into an endless loop (seen with a truncated pages image: preadv returning 0 forever).
CRIU_RESTORE_BASE_S = 10.0
CRIU_RESTORE_MIN_RATE = 100e6  # bytes/s
PID_FREE_WAIT_S = 5.0
RESTORE_READY_TIMEOUT_S = 60.0
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)


# --- GPU layout (tensor-parallel ranks) -----------------------------------------------------------

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


def gpu_layout_problem(layout: dict[str, Any] | None, visible_count: int) -> str | None:
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


class RestoreFailed(Exception):
    """A restore step failed; the message is the reason recorded for the cold start."""


class WorkloadBroken(RuntimeError):
    """A checkpoint failed after the CUDA state left the GPUs and could not be put back: the
    workload cannot go on (its ranks are frozen), so it is stopped and the container restarts cold."""


# --- outcome ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened, for people and for the agent: written as JSON after every change."""

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The node cache, where a copy goes for the agent to post as Events (thaw/node/events.py): with the
    # pod's uid only (a container the webhook did not inject has none).
    cache: Path | None = None
    copy_failed: bool = False

    def update(self, **values: Any) -> None:
        with self.lock:
            self.data.update(values)
            self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if self.path is not None:
                try:
                    write_json_atomic(self.path, self.data)
                except OSError as exc:
                    log.warning("cannot write outcome file %s: %s", self.path, exc)
            uid = self.data.get("pod", {}).get("uid")
            if self.cache is not None and uid:
                from thaw.snapshot.outcome_copy import write_outcome_copy

                try:
                    write_outcome_copy(self.cache, uid, orjson.dumps(self.data))
                except (OSError, ValueError) as exc:
                    if not self.copy_failed:  # once: every later update would fail the same way
                        log.warning("cannot leave the outcome in the node cache %s: %s", self.cache, exc)
                    self.copy_failed = True


# The pod's identity, as the webhook injects it (downward API), so an outcome file read off a node
# (by the agent, an operator or an event) says which pod it belongs to.
POD_ENV = {
    "name": "THAW_POD_NAME",
    "namespace": "THAW_POD_NAMESPACE",
    "uid": "THAW_POD_UID",
    "node": "THAW_NODE_NAME",
    "container": "THAW_CONTAINER",
}


def pod_identity(environ: Mapping[str, str]) -> dict[str, str]:
    """The pod's name, namespace, node and container from the injected env; only those set."""
    return {key: environ[var] for key, var in POD_ENV.items() if environ.get(var)}


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- PID 1 duties -----------------------------------------------------------------------------


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


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


# --- starting the workload --------------------------------------------------------------------


def last_pid() -> int:
    try:
        return int(Path("/proc/sys/kernel/ns_last_pid").read_text().strip())
    except (OSError, ValueError):
        return 0


def advance_pid_counter(floor: int) -> str:
    """Make the next PID at least ``floor``; say how (or why not) for the log."""
    if last_pid() >= floor:
        return "already past"
    try:
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(floor - 1))
        return "ns_last_pid"
    except OSError:
        pass
    # Fork and reap until the counter passes the floor; stops on wrap-around.
    prev = 0
    while True:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        if pid >= floor - 1 or pid < prev:
            return f"forked up to {pid}"
        prev = pid


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


# --- restore ----------------------------------------------------------------------------------


def load_meta(images: Path) -> dict[str, Any]:
    try:
        meta = orjson.loads((images / META_NAME).read_bytes())
    except FileNotFoundError as exc:
        raise RestoreFailed(f"snapshot has no {META_NAME} (not taken by thaw exec)") from exc
    except (OSError, orjson.JSONDecodeError) as exc:
        raise RestoreFailed(f"snapshot's {META_NAME} is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise RestoreFailed(f"snapshot's {META_NAME} has an unknown format (want {META_FORMAT})")
    return meta


def inherit_list(stdio: dict[str, str], fds: dict[int, int]) -> list[tuple[int, str]]:
    """--inherit-fd pairs: the old stdout/stderr (pipes, sockets) -> our current ones (pure).

    ``fds`` maps the workload's fd (1, 2) to the fd number criu gets for it. Paths are reopened by
    CRIU itself and are not listed; one pipe used for both is listed once.
    """
    out: list[tuple[int, str]] = []
    seen: set[str] = set()
    for fd in (1, 2):
        name = stdio.get(str(fd))
        if not name or name.startswith("/") or name in seen:
            continue
        seen.add(name)
        out.append((fds[fd], name))
    return out


def image_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.iterdir() if p.is_file())


def restore_timeout(nbytes: int) -> float:
    """How long CRIU may take to restore ``nbytes`` of image before it is given up on (pure)."""
    return CRIU_RESTORE_BASE_S + nbytes / CRIU_RESTORE_MIN_RATE


@contextlib.contextmanager
def _holding(snapshot_dir: Path) -> Iterator[None]:
    """The node cache's in-use mark, so the agent never evicts a snapshot being restored."""
    try:
        from thaw.snapshot.cache import in_use
    except ImportError:
        yield
        return
    with in_use(snapshot_dir):
        yield


def restore(
    plan: Plan,
    *,
    cmd: list[str],
    sup: Supervisor,
    opts: criu.CriuOptions,
    logs: Path,
    ready: ReadySpec | None,
    outcome: Outcome,
) -> bool:
    """Restore the plan's snapshot and adopt its root. False (and the reason recorded) on failure."""
    snapshot_dir = Path(plan.get("path", ""))
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    restored: list[int] = []
    pids: list[int] = []
    try:
        with _holding(snapshot_dir):
            binary = criu.find_criu()
            meta = load_meta(snapshot_dir)
            if meta.get("cmd") != cmd:
                raise RestoreFailed(
                    f"snapshot was taken of command {meta.get('cmd')!r}, this pod runs {cmd!r}"
                )
            pids = [int(p) for p in meta.get("pids", [])]
            # Every rank restores onto the GPU ordinals it had, or none does (never half a server).
            problem = gpu_layout_problem(meta.get("gpu"), len(visible_gpu_minors()))
            if problem:
                raise RestoreFailed(problem)
            # Connections are restored the way they were dumped (closed, or kept inside the tree).
            opts = replace(opts, tcp_established=bool(meta.get("tcp_established", False)))
            busy = criu.wait_pids_free(pids, PID_FREE_WAIT_S)
            if busy:
                raise RestoreFailed(f"PIDs {busy[:5]} of the snapshot are taken in this container")
            stdio_fds = {1: os.dup(1), 2: os.dup(2)}
            pidfile = logs / "restore.pid"
            pidfile.unlink(missing_ok=True)
            args = criu.restore_args(
                binary,
                snapshot_dir,
                logs,
                opts,
                pidfile=pidfile,
                inherit=inherit_list(meta.get("stdio", {}), stdio_fds),
            )
            try:
                for attempt in range(3):
                    try:
                        criu.run(
                            args,
                            logs / "restore.log",
                            restore_timeout(image_bytes(snapshot_dir)),
                            list(stdio_fds.values()),
                        )
                        break
                    except criu.CriuError as exc:
                        text = (
                            (logs / "restore.log").read_text(errors="replace")
                            if (logs / "restore.log").exists()
                            else ""
                        )
                        if attempt < 2 and criu.pid_file_busy(text):
                            sup.reap_nohang()
                            time.sleep(0.5)
                            continue
                        raise RestoreFailed(str(exc)) from exc
            finally:
                for fd in stdio_fds.values():
                    os.close(fd)
            timings["criu_restore_s"] = round(time.monotonic() - t0, 3)
            try:
                root = int(pidfile.read_text().strip())
            except (OSError, ValueError) as exc:
                raise RestoreFailed(f"criu restore wrote no root PID ({exc})") from exc
            restored = criu.tree(root) or [root]
            sup.adopt(root)
            cuda_pids = [int(p) for p in meta.get("cuda_pids", [])]
            if cuda_pids:
                t1 = time.monotonic()
                from thaw.runtime.cuda import Cuda, CudaError, CudaUnavailable, gpu_remap

                try:
                    cuda = Cuda.load()
                    here = gpu_uuids_or_none(cuda)  # unreadable: no remap, the driver's default
                    old = list(meta.get("gpu", {}).get("uuids", []))
                    pairs = gpu_remap(old, here) if here is not None else None
                    if pairs:
                        log.info("restoring onto other GPUs: %s", ", ".join(f"{o} -> {n}" for o, n in pairs))
                        timings["gpu_remap"] = len(pairs)
                    cuda.thaw(cuda_pids, pairs)
                except (CudaError, CudaUnavailable, ValueError) as exc:
                    raise RestoreFailed(f"CUDA restore failed: {exc}") from exc
                timings["cuda_restore_s"] = round(time.monotonic() - t1, 3)
        wake = meta.get("wake")  # the snapshot was taken asleep (thaw.contract.hooks): wake this replica
        if isinstance(wake, str):
            t3 = time.monotonic()
            failed = hooks.call(wake)
            if failed is not None:
                raise RestoreFailed(f"restored server did not wake: {failed.reason}")
            timings["wake_s"] = round(time.monotonic() - t3, 3)
        if ready is not None:
            t2 = time.monotonic()
            why = wait_ready(ready, RESTORE_READY_TIMEOUT_S, alive=sup.alive)
            if why is not None:
                raise RestoreFailed(f"restored server is not ready: {why}")
            timings["ready_s"] = round(time.monotonic() - t2, 3)
    except (RestoreFailed, criu.CriuError, OSError) as exc:
        reason = str(exc)
        # Whatever of the tree exists now is this restore's (its PIDs were checked free before).
        leftovers = sorted(set(restored) | set(criu.pids_in_use(pids)) | ({sup.root} if sup.root else set()))
        if leftovers:
            sup.kill_tree(leftovers)
        log.error("restore failed, cold start: %s", reason)
        outcome.update(result="cold", reason=f"restore failed: {reason}", timings=timings)
        return False
    timings["total_s"] = round(time.monotonic() - t0, 3)
    log.info("restored snapshot %s in %.2fs %s", plan.get("snapshot"), timings["total_s"], timings)
    outcome.update(result="restored", reason=None, root_pid=sup.root, timings=timings)
    return True


# --- checkpoint -------------------------------------------------------------------------------


@dataclass
class CheckpointConfig:
    ready: ReadySpec
    ready_timeout: float
    store: Path
    key: Path | None
    name: str
    workload: str
    facts: Path | None
    cache: Path | None
    opts: criu.CriuOptions
    logs: Path
    hooks: tuple[str, str] | None = None  # (sleep, wake) URLs: thaw.contract.hooks


def stdio_names() -> dict[str, str]:
    out: dict[str, str] = {}
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            out[str(fd)] = os.readlink(f"/proc/self/fd/{fd}")
    return out


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


def dump(root: int, cmd: list[str], images: Path, cfg: CheckpointConfig) -> dict[str, Any]:
    """Sleep hook, lock+checkpoint CUDA, dump with CRIU leaving the tree running, restore+unlock
    CUDA, wake hook.

    Returns the metadata written into ``images``. Raises RuntimeError with the reason.
    """
    timings: dict[str, float] = {}
    binary = criu.find_criu()
    pids = criu.tree(root)
    if not pids:
        raise RuntimeError("the workload exited before the checkpoint")
    fds = {p: criu.fd_targets(p) for p in pids}
    fds_before = fds  # the CUDA checkpoint closes the GPU device files: read which ones first
    gpu_users = [p for p, f in fds.items() if any(t.startswith("/dev/nvidia") for t in f.values())]
    cuda = None
    cuda_pids: list[int] = []
    if gpu_users:
        from thaw.runtime.cuda import Cuda, CudaUnavailable

        try:
            cuda = Cuda.load()
        except CudaUnavailable as exc:
            raise RuntimeError(f"processes {gpu_users} use the GPU but {exc}") from exc
        cuda_pids = cuda.cuda_pids(pids)
    uuids = gpu_uuids_or_none(cuda)
    with _asleep(cfg.hooks, timings):
        frozen = False
        try:
            if cuda is not None and cuda_pids:
                t = time.monotonic()
                tries = cuda.freeze_retrying(
                    cuda_pids, CUDA_LOCK_TIMEOUT_MS, attempts=CUDA_LOCK_ATTEMPTS, pause_s=CUDA_LOCK_PAUSE_S
                )
                frozen = True
                timings["cuda_checkpoint_s"] = round(time.monotonic() - t, 3)
                if tries > 1:
                    timings["cuda_lock_attempts"] = tries
            fds = {p: criu.fd_targets(p) for p in pids}
            left = criu.device_fds(fds)
            if left:
                log.warning("GPU device files still open after the CUDA checkpoint: %s", "; ".join(left))
            reasons = criu.undumpable_reasons(fds)
            if reasons:
                raise RuntimeError("; ".join(reasons))
            t = time.monotonic()
            criu.run(
                criu.dump_args(binary, root, images, cfg.logs, cfg.opts),
                cfg.logs / "dump.log",
                CRIU_DUMP_TIMEOUT_S,
            )
            timings["criu_dump_s"] = round(time.monotonic() - t, 3)
        finally:
            if frozen and cuda is not None:
                from thaw.runtime.cuda import CudaError

                t = time.monotonic()
                try:
                    cuda.thaw(cuda_pids)
                except CudaError as exc:
                    why = f"the CUDA state could not be put back after the checkpoint: {exc}"
                    raise WorkloadBroken(why) from exc
                timings["cuda_restore_s"] = round(time.monotonic() - t, 3)
    meta = {
        "format": META_FORMAT,
        "root_pid": root,
        "pids": pids,
        "cuda_pids": cuda_pids,
        "cmd": cmd,
        "stdio": stdio_names(),
        "tcp_established": cfg.opts.tcp_established,
        "gpu": gpu_layout(
            cuda_pids, fds_before, visible_gpu_minors(), {p: rank_env(p) for p in cuda_pids}, uuids
        ),
        "timings": timings,
    }
    if cfg.hooks is not None:
        meta["wake"] = cfg.hooks[1]  # a restored replica is as asleep as this server was: wake it
    (images / META_NAME).write_bytes(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS))
    return meta


@contextlib.contextmanager
def _asleep(pair: tuple[str, str] | None, timings: dict[str, float]) -> Iterator[None]:
    """Run the body with the workload asleep (its sleep hook called, its wake hook after). Raises
    RuntimeError when it would not sleep, WorkloadBroken when it may be asleep and would not wake."""
    if pair is None:
        yield
        return
    sleep, wake = pair
    t = time.monotonic()
    failed = hooks.call(sleep)
    if failed is not None and failed.refused:  # it did nothing, so it is awake: nothing to undo
        raise RuntimeError(f"sleep hook: {failed.reason}")
    timings["sleep_s"] = round(time.monotonic() - t, 3)
    broken = False
    try:
        if failed is not None:  # it may be half asleep: the wake below still runs
            raise RuntimeError(f"sleep hook: {failed.reason}")
        yield
    except WorkloadBroken:
        broken = True  # the tree stays frozen and is stopped: a wake would only hang
        raise
    finally:
        if not broken:
            t = time.monotonic()
            woke = hooks.call(wake)
            if woke is not None:
                raise WorkloadBroken(f"the server did not wake after the checkpoint: {woke.reason}")
            timings["wake_s"] = round(time.monotonic() - t, 3)


def images_dir(cache: Path | None) -> Path:
    """A fresh directory for the dump; inside the node cache when given (same filesystem, so the
    local copy is a rename), else in the temporary directory."""
    base = cache if cache is not None else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".thaw-dump-", dir=base))


def publish_images(images: Path, cfg: CheckpointConfig, outcome: Outcome) -> None:
    from thaw.snapshot.nodefacts import node_facts
    from thaw.snapshot.store import DirectoryStore, publish

    t = time.monotonic()
    try:
        facts = node_facts(cfg.facts)
        manifest = publish(DirectoryStore(cfg.store), cfg.name, cfg.workload, images, cfg.key, facts)
        info: dict[str, Any] = {
            "status": "published",
            "snapshot": manifest["id"],
            "bytes": manifest.get("total_bytes"),
            "publish_s": round(time.monotonic() - t, 3),
        }
        if cfg.cache is not None:
            try:
                from thaw.snapshot.cache import add_local

                add_local(cfg.cache, manifest, images)
                info["cached"] = True
            except Exception as exc:  # the store has it; the local copy is an optimisation
                log.warning("snapshot published but not kept in the node cache: %s", exc)
                info["cached"] = f"failed: {exc}"
        log.info("published snapshot %s (%s bytes)", manifest["id"], manifest.get("total_bytes"))
        outcome.update(checkpoint={**outcome.data.get("checkpoint", {}), **info})
    except Exception as exc:
        log.error("checkpoint taken but not published: %s", exc)
        outcome.update(
            checkpoint={**outcome.data.get("checkpoint", {}), "status": "failed", "reason": f"publish: {exc}"}
        )
    finally:
        shutil.rmtree(images, ignore_errors=True)


def checkpoint(
    root: int, cmd: list[str], sup: Supervisor, cfg: CheckpointConfig, outcome: Outcome
) -> threading.Thread | None:
    """Wait until ready, dump, and publish in the background. Never raises; never stops the server."""
    t0 = time.monotonic()
    outcome.update(checkpoint={"status": "waiting for ready"})
    why = wait_ready(cfg.ready, cfg.ready_timeout, alive=sup.alive)
    if why is not None:
        log.error("no checkpoint: %s", why)
        outcome.update(checkpoint={"status": "failed", "reason": why})
        return None
    ready_s = round(time.monotonic() - t0, 3)
    images: Path | None = None
    try:
        images = images_dir(cfg.cache)
        meta = dump(root, cmd, images, cfg)
    except WorkloadBroken as exc:
        # Never half a server: a frozen tree would pass a TCP probe and answer nothing. Stopped,
        # the container restarts cold, and the outcome file (the pod's emptyDir) keeps the restart
        # from trying again (checkpoint_blocked).
        if images is not None:
            shutil.rmtree(images, ignore_errors=True)
        log.error("checkpoint failed and the workload cannot go on; stopping it: %s", exc)
        outcome.update(
            checkpoint={"status": "failed", "reason": str(exc), "ready_s": ready_s, "stopped_workload": True}
        )
        sup.kill_tree(criu.tree(root) or [root])
        return None
    except Exception as exc:
        if images is not None:
            shutil.rmtree(images, ignore_errors=True)
        log.error("checkpoint failed, server keeps running: %s", exc)
        outcome.update(checkpoint={"status": "failed", "reason": str(exc), "ready_s": ready_s})
        return None
    outcome.update(checkpoint={"status": "publishing", "ready_s": ready_s, **meta["timings"]})
    log.info("checkpoint taken in %s; publishing", meta["timings"])
    # Publishing copies and hashes gigabytes: in a thread, so PID 1 goes back to reaping and
    # forwarding signals. It starts no processes, so it does not race the reaper.
    t = threading.Thread(target=publish_images, args=(images, cfg, outcome), name="thaw-publish", daemon=True)
    t.start()
    return t


# --- the command ------------------------------------------------------------------------------


def read_outcome(path: Path | None) -> dict[str, Any]:
    """The outcome file an earlier run of this container left (the pod's emptyDir), or {}."""
    if path is None:
        return {}
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def checkpoint_blocked(earlier: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint record for this run when an earlier run in this pod had to stop the workload
    to checkpoint it (so a restart would only do it again), else None."""
    ck = earlier.get("checkpoint")
    if not isinstance(ck, Mapping) or not ck.get("stopped_workload"):
        return None
    first = str(ck.get("first_reason") or ck.get("reason", ""))
    return {
        "status": "skipped",
        "reason": f"an earlier checkpoint in this pod had to stop the workload: {first}",
        "first_reason": first,
        "stopped_workload": True,
    }


def logs_dir(outcome_path: Path | None) -> Path:
    """Where CRIU's logs go: beside the outcome file (the plan's emptyDir) when writable, else a
    temporary directory (a read-only plan volume must not turn into a failed restore)."""
    if outcome_path is not None:
        with contextlib.suppress(OSError):
            outcome_path.parent.mkdir(parents=True, exist_ok=True)
        if os.access(outcome_path.parent, os.W_OK):
            return outcome_path.parent
        log.warning("%s is not writable: CRIU's logs go to a temporary directory", outcome_path.parent)
    return Path(tempfile.mkdtemp(prefix="thaw-exec-"))


def workload_command(raw: list[str]) -> list[str]:
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no workload command: use thaw exec [flags] -- CMD ARGS...")
    return cmd


def checkpoint_config(
    args: argparse.Namespace, opts: criu.CriuOptions, logs: Path
) -> CheckpointConfig | None:
    if args.checkpoint != "on-ready":
        return None
    missing = [
        f
        for f, v in (
            ("--ready", args.ready),
            ("--store", args.store),
            ("--name", args.name),
            ("--workload", args.workload),
        )
        if not v
    ]
    if missing:
        raise UsageError(f"--checkpoint on-ready needs {', '.join(missing)}")
    try:
        ready = parse_ready(args.ready)
        hooks = resolve_pair(args.sleep, args.wake, args.ready, ("--sleep", "--wake"))
    except (ReadySpecError, HookError) as exc:
        raise UsageError(str(exc)) from exc
    return CheckpointConfig(
        ready=ready,
        ready_timeout=float(args.ready_timeout),
        store=args.store,
        key=args.key,
        name=args.name,
        workload=args.workload,
        facts=args.facts,
        cache=args.cache,
        opts=opts,
        logs=logs,
        hooks=hooks,
    )


def run(args: argparse.Namespace) -> int:
    cmd = workload_command(args.cmd)
    outcome_path: Path | None = args.outcome or (args.plan.parent / "outcome.json" if args.plan else None)
    logs = logs_dir(outcome_path)
    opts = criu.CriuOptions(
        network_lock=criu.detect_network_lock(),
        tcp_established=bool(args.tcp_established),
        extra=criu.detect_mode_flags(),  # --unprivileged without CAP_SYS_ADMIN, as in a pod
    )
    cfg = checkpoint_config(args, opts, logs)
    blocked = checkpoint_blocked(read_outcome(outcome_path)) if cfg is not None else None
    if blocked is not None:
        log.error("no checkpoint in this pod: %s (delete the pod to try again)", blocked["reason"])
        cfg = None
    ready: ReadySpec | None = None
    if args.ready:
        try:
            ready = parse_ready(args.ready)
        except ReadySpecError as exc:
            raise UsageError(str(exc)) from exc
    if os.getpid() != 1 and not become_subreaper():
        log.warning("cannot become a child subreaper: restored processes may not be reaped")
    sup = Supervisor()
    sup.install()
    plan = read_plan(args.plan)
    pod = pod_identity(os.environ)
    if pod:
        log.info("pod %s", " ".join(f"{k}={v}" for k, v in pod.items()))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    outcome = Outcome(
        outcome_path,
        {"plan": dict(plan), "cmd": cmd, "started": started, **({"pod": pod} if pod else {})},
        cache=args.cache,
    )
    if blocked is not None:
        outcome.update(checkpoint=blocked)
    restored = False
    if plan["action"] == "restore":
        restored = restore(plan, cmd=cmd, sup=sup, opts=opts, logs=logs, ready=ready, outcome=outcome)
    else:
        log.info("cold start: %s", plan.get("reason"))
        outcome.update(result="cold", reason=plan.get("reason"))
    publisher: threading.Thread | None = None
    if not restored:
        proc = spawn(cmd, args.pid_floor if cfg is not None else None)
        sup.adopt(proc.pid)
        if sup.signalled is not None:  # a signal that came while nothing ran yet
            os.kill(proc.pid, sup.signalled)
        if cfg is not None and plan["action"] == "cold":
            publisher = checkpoint(proc.pid, cmd, sup, cfg, outcome)
    code = sup.wait()
    if publisher is not None and publisher.is_alive():
        log.warning("workload exited while its snapshot was being published; the publish is abandoned")
    outcome.update(exit_code=code)
    sys.stdout.flush()
    return code
