"""Plan ``restore``: the snapshot is held and verified (thaw.snapshot.cache.hold_verified: the use
lock taken shared through the workload's read-only mount, the manifest's id checked against the
plan's, every file re-hashed) right before CRIU restores the process tree from it; then the CUDA
driver puts GPU memory back (restore, then unlock, for every CUDA process of the tree), then the
snapshot's wake hook is called if it was taken asleep, then the ready gate opens (``<work>/ready``;
with ``--ready-gate stopped`` the tree stays stopped until CUDA is back:
thaw.runtime.workdir.ReadyGate), then, if ``--ready`` is given, the restored server must answer
before it is accepted.

Any failure (an evicted or altered snapshot included) kills what was restored and the caller runs
CMD (a cold start): a restore never crash-loops a pod. Why is logged and written to the outcome
file. The restore waits briefly for PIDs still held by a dead tree's zombies ("Can't fork for PID:
File exists") and retries CRIU once more if it still hits one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.hooks import Hook, HookError, from_json
from thaw.contract.plan import Plan
from thaw.runtime import criu, hooks
from thaw.runtime.checkpoint import META_FORMAT, META_NAME
from thaw.runtime.gpu import container_gpu_problem, gpu_uuids_or_none, visible_gpu_minors
from thaw.runtime.outcome import Outcome
from thaw.runtime.podfiles import PodFilesError, PutBack, put_back
from thaw.runtime.ready import ReadySpec, wait_ready
from thaw.runtime.replica_config import differences
from thaw.runtime.stopped import NoRestoreThread, continue_tree, restore_threads, running_alone
from thaw.runtime.supervisor import Supervisor, exit_note
from thaw.runtime.workdir import ReadyGate
from thaw.snapshot.cache import CacheError, hold_verified

log = logging.getLogger("thaw.exec")

# A restore gets this long plus its image at a slow disk's rate: a damaged image can send CRIU's
# restorer into an endless loop (seen with a truncated pages image: preadv returning 0 forever).
CRIU_RESTORE_BASE_S = 10.0
CRIU_RESTORE_MIN_RATE = 100e6  # bytes/s
PID_FREE_WAIT_S = 5.0
HOLD_WAIT_S = 30.0  # for the snapshot's use lock (eviction holds it exclusively only for a rename)
RESTORE_READY_TIMEOUT_S = 60.0


def _thaw_gpus(
    cuda: Any,
    cuda_pids: list[int],
    pairs: list[tuple[str, str]] | None,
    stopped_tree: list[int] | None,
    timings: dict[str, float],
) -> None:
    """CUDA restore and unlock of every rank. With ``stopped_tree`` (``--ready-gate stopped``) only
    the driver's restore threads run meanwhile; a driver that names none gets the tree running first
    (recorded: ``stopped_gate`` 0)."""
    if stopped_tree is None:
        cuda.thaw(cuda_pids, pairs)
        return
    try:
        tids = restore_threads(cuda, cuda_pids)
    except NoRestoreThread as exc:
        log.warning("%s: the tree runs while its GPU state comes back (the ready file still gates)", exc)
        timings["stopped_gate"] = 0
        continue_tree(stopped_tree)
        cuda.thaw(cuda_pids, pairs)
        return
    with running_alone(tids.values()):
        cuda.thaw(cuda_pids, pairs)
    timings["stopped_gate"] = 1


class RestoreFailed(Exception):
    """A restore step failed; the message is the reason recorded for the cold start."""


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
    """--inherit-fd pairs: the old stdout/stderr -> our current ones, whatever each was (pure).

    ``stdio`` holds CRIU's names for them (criu.stdio_resource: ``pipe:[N]``, ``socket:[N]``,
    ``tty[RDEV:DEV]``, ``path/to/file``); a snapshot from before those names holds the path with its
    leading slash, which is dropped. ``fds`` maps the workload's fd (1, 2) to the fd number criu gets
    for it; one file used for both is listed once.
    """
    out: list[tuple[int, str]] = []
    seen: set[str] = set()
    for fd in (1, 2):
        name = stdio.get(str(fd), "").removeprefix("/")
        if not name or name in seen:
            continue
        seen.add(name)
        out.append((fds[fd], name))
    return out


def image_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.iterdir() if p.is_file())


def restore_timeout(nbytes: int) -> float:
    """How long CRIU may take to restore ``nbytes`` of image before it is given up on (pure)."""
    return CRIU_RESTORE_BASE_S + nbytes / CRIU_RESTORE_MIN_RATE


def _wake_hook(meta: dict[str, Any]) -> Hook | None:
    """The wake hook a snapshot taken asleep recorded (a URL, as before sequences existed, or a list
    of steps: thaw.contract.hooks.to_json), or None; RestoreFailed when it is not a valid one."""
    if meta.get("wake") is None:
        return None
    try:
        return from_json("the snapshot's wake hook", meta["wake"])
    except HookError as exc:
        raise RestoreFailed(str(exc)) from exc


def restore(
    plan: Plan,
    *,
    cmd: list[str],
    sup: Supervisor,
    opts: criu.CriuOptions,
    logs: Path,
    ready: ReadySpec | None,
    outcome: Outcome,
    gate: ReadyGate | None = None,
    criu_stock: bool = False,
) -> bool:
    """Restore the plan's snapshot and adopt its root. False (and the reason recorded) on failure.

    CRIU: the fast-restore build where present and working (criu.restore_criu), else stock; a fast
    restore that fails is tried once more with stock. ``criu_stock``: stock only. The outcome's
    ``criu`` says which restored (kind, binary, note), its timings ``criu_fast`` 1 or 0."""
    snapshot_dir = Path(plan.get("path", ""))
    gate = gate or ReadyGate(None)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    restored: list[int] = []
    pids: list[int] = []
    put: PutBack | None = None
    chosen: criu.RestoreCriu | None = None
    try:
        # The use lock (the agent does not evict it meanwhile), the plan's id, every file re-hashed:
        # what CRIU reads below is what was signed. SnapshotGone, CacheBusy, VerifyFailed: cold.
        with hold_verified(snapshot_dir, plan.get("snapshot", ""), time.monotonic() + HOLD_WAIT_S):
            timings["verify_s"] = round(time.monotonic() - t0, 3)
            binary = criu.find_criu()
            meta = load_meta(snapshot_dir)
            if meta.get("cmd") != cmd:
                raise RestoreFailed(
                    f"snapshot was taken of command {meta.get('cmd')!r}, this pod runs {cmd!r}"
                )
            differs = differences(meta.get("config"), os.environ)  # thaw.runtime.replica_config
            if differs:
                raise RestoreFailed(differs)
            wake = _wake_hook(meta)  # checked before anything is restored
            pids = [int(p) for p in meta.get("pids", [])]
            # Every rank restores onto the GPU ordinals it had, or none does (never half a server).
            problem = container_gpu_problem(meta.get("gpu"), len(visible_gpu_minors()))
            if problem:
                raise RestoreFailed(problem)
            # Connections are restored the way they were dumped (closed, or kept inside the tree).
            opts = replace(opts, tcp_established=bool(meta.get("tcp_established", False)))
            busy = criu.wait_pids_free(pids, PID_FREE_WAIT_S)
            if busy:
                raise RestoreFailed(f"PIDs {busy[:5]} of the snapshot are taken in this container")
            t_files = time.monotonic()
            try:  # the files a new pod lacks, where CRIU will reopen them (thaw.runtime.podfiles)
                put = put_back(snapshot_dir)
            except PodFilesError as exc:
                raise RestoreFailed(str(exc)) from exc
            if put.files:
                timings["pod_files"] = put.files
                timings["pod_files_s"] = round(time.monotonic() - t_files, 3)
            stdio_fds = {1: os.dup(1), 2: os.dup(2)}
            pidfile = logs / "restore.pid"
            pidfile.unlink(missing_ok=True)
            chosen = criu.restore_criu(binary, force_stock=criu_stock)
            args = criu.restore_args(
                chosen.binary,
                snapshot_dir,
                logs,
                opts,
                pidfile=pidfile,
                inherit=inherit_list(meta.get("stdio", {}), stdio_fds),
            )
            if gate.stopped:
                args.append("--leave-stopped")  # SIGCONT once CUDA is back (thaw.runtime.stopped)
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
                        if chosen.kind == "fast" and attempt < 2 and not isinstance(exc, criu.CriuTimeout):
                            # Stock may restore what the fast build did not: once more with stock,
                            # its log kept beside (restore-fast.log), the tree it left reaped first.
                            # Not after a timeout: an image that loops one loops both.
                            log.warning("fast CRIU failed, restoring with stock CRIU: %s", exc)
                            with contextlib.suppress(OSError):
                                (logs / "restore.log").replace(logs / "restore-fast.log")
                            chosen = criu.RestoreCriu(binary, "stock", f"fast CRIU failed: {exc}")
                            args[0] = binary
                            sup.reap_nohang()
                            criu.wait_pids_free(pids, PID_FREE_WAIT_S)
                            continue
                        raise RestoreFailed(str(exc)) from exc
            finally:
                for fd in stdio_fds.values():
                    os.close(fd)
            timings["criu_restore_s"] = round(time.monotonic() - t0, 3)
            timings["criu_fast"] = 1 if chosen.kind == "fast" else 0
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
                    _thaw_gpus(cuda, cuda_pids, pairs, restored if gate.stopped else None, timings)
                except (CudaError, CudaUnavailable, ValueError, OSError) as exc:
                    raise RestoreFailed(f"CUDA restore failed: {exc}") from exc
                timings["cuda_restore_s"] = round(time.monotonic() - t1, 3)
            if gate.stopped:
                continue_tree(restored)
        if wake is not None:  # the snapshot was taken asleep (thaw.contract.hooks): wake this replica
            t3 = time.monotonic()
            failed = hooks.run(wake)
            if failed is not None:
                raise RestoreFailed(f"restored server did not wake: {failed.reason}")
            timings["wake_s"] = round(time.monotonic() - t3, 3)
        gate.open()  # GPU state back, server awake: the startupProbe may pass
        timings["gate_s"] = round(time.monotonic() - t0, 3)
        if ready is not None:
            t2 = time.monotonic()
            why = wait_ready(ready, RESTORE_READY_TIMEOUT_S, alive=sup.alive)
            if why is not None:
                raise RestoreFailed(f"restored server is not ready: {why}{exit_note(sup.status)}")
            timings["ready_s"] = round(time.monotonic() - t2, 3)
    except Exception as exc:  # RestoreFailed, CriuError, CacheError, OSError, or a bug: cold, never a crash
        known = (RestoreFailed, criu.CriuError, CacheError, OSError)
        reason = str(exc) if isinstance(exc, known) else f"{type(exc).__name__}: {exc}"
        # Whatever of the tree exists now is this restore's (its PIDs were checked free before).
        leftovers = sorted(set(restored) | set(criu.pids_in_use(pids)) | ({sup.root} if sup.root else set()))
        if leftovers:
            sup.kill_tree(leftovers)
        if put is not None:
            put.undo()  # the cold start gets the pod's own files, not the snapshot's
        log.error("restore failed, cold start: %s", reason)
        outcome.update(
            result="cold",
            reason=f"restore failed: {reason}",
            timings=timings,
            **({"criu": chosen.record()} if chosen else {}),
        )
        return False
    timings["total_s"] = round(time.monotonic() - t0, 3)
    log.info("restored snapshot %s in %.2fs %s", plan.get("snapshot"), timings["total_s"], timings)
    outcome.update(
        result="restored",
        reason=None,
        root_pid=sup.root,
        timings=timings,
        criu=chosen.record() if chosen else {},
    )
    return True
