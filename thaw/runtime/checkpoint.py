"""Plan ``cold`` with ``--checkpoint on-ready``: once CMD is ready, ask the publisher whether it
would take a dump (:mod:`thaw.runtime.publish`: thaw-sidecar in a pod, or in-process by hand) and
check that the work directory, the node cache and the container's memory limit can take it
(:mod:`thaw.runtime.room`); mark the checkpoint in progress; lock and checkpoint CUDA in every
process that has CUDA state, dump the tree with CRIU into ``<work>/dump/`` leaving it running,
restore and unlock CUDA; then hand the dump to the publisher (in a thread) and record what became
of it. With sleep and wake hooks the server is put to sleep around the dump. A failed or refused
checkpoint never stops the server; it is logged and recorded (unless the CUDA state could not be put
back: then the workload is stopped, :class:`WorkloadBroken`).

Once per pod (thaw.runtime.workdir): ``checkpoint.inprogress`` is written before the dump and
``checkpoint.done`` when a checkpoint that got that far ends. A restarted container that finds the
first (it was killed mid-checkpoint: out of memory, evicted) or the second does not checkpoint
again, records "skipped" with the reason, and deletes a dead dump that was never handed over.

Snapshot metadata (``thaw-exec.json`` in the images, covered by the signed manifest): format, root
PID, all PIDs, CUDA PIDs (in lock order), the command, the names of the workload's stdout and
stderr at checkpoint time (rebound to the new container's on restore), the GPU layout
(:mod:`thaw.runtime.gpu`), and the wake hook when it was taken asleep.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.hooks import Hook, to_json
from thaw.contract.manifest import EXEC_META_NAME
from thaw.runtime import criu, hooks, workdir
from thaw.runtime.gpu import (
    gpu_layout,
    gpu_minors,
    gpu_used_bytes,
    gpu_uuids_or_none,
    rank_env,
    visible_gpu_minors,
)
from thaw.runtime.outcome import Outcome
from thaw.runtime.podfiles import DEFAULT_LIMIT as POD_FILES_LIMIT
from thaw.runtime.publish import Publisher
from thaw.runtime.ready import ReadySpec, wait_ready
from thaw.runtime.room import Need, refusal, room, tree_bytes
from thaw.runtime.supervisor import Supervisor

log = logging.getLogger("thaw.exec")

META_NAME = EXEC_META_NAME  # signed with the snapshot: the manifest lists it, and copies its GPU layout
META_FORMAT = 1
# Locking waits only for kernels already launched (milliseconds), unless ranks wait on each other in
# a collective (Cuda.freeze_retrying): then it times out, every rank is unlocked and it is tried again.
CUDA_LOCK_TIMEOUT_MS = 10_000
CUDA_LOCK_ATTEMPTS = 6
CUDA_LOCK_PAUSE_S = 5.0
CRIU_DUMP_TIMEOUT_S = 1800.0


class WorkloadBroken(RuntimeError):
    """A checkpoint failed after the CUDA state left the GPUs and could not be put back: the
    workload cannot go on (its ranks are frozen), so it is stopped and the container restarts cold."""


@dataclass
class CheckpointConfig:
    ready: ReadySpec
    ready_timeout: float
    work: Path  # the work emptyDir: dump/, the markers, the publisher's request and result
    publisher: Publisher  # thaw-sidecar (SidecarPublisher) or in-process (LocalPublisher)
    opts: criu.CriuOptions
    logs: Path
    hooks: tuple[Hook, Hook] | None = None  # (sleep, wake), resolved: thaw.contract.hooks
    pod_files_limit: int = POD_FILES_LIMIT  # bytes of pod files a snapshot may carry (thaw.runtime.podfiles)


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
        from thaw.runtime.blockers import gpu_holders_refusal, runtime_refusal

        # before the lock: one line, with the fix
        refused = gpu_holders_refusal(pids, cuda_pids, fds) or runtime_refusal(cuda_pids)
        if refused:
            raise RuntimeError(refused)
    from thaw.runtime import podfiles, replica_config

    try:  # before anything is frozen: a configuration that cannot be recorded means no snapshot
        config = replica_config.record(os.environ)
    except replica_config.ConfigError as exc:
        raise RuntimeError(str(exc)) from exc
    stdio = criu.stdio_resources()  # what a restore rebinds to the new container's (criu.stdio_resource)
    # CRIU's post-dump action copies the pod files while the tree is frozen (thaw.runtime.podfiles);
    # files of the root filesystem changed since thaw exec started are the container's writable layer.
    refusal_file = cfg.logs / "podfiles-refused"
    script = podfiles.write_action_script(
        cfg.logs / "criu-action.sh",
        images,
        since=podfiles.process_start(os.getpid()),
        limit=cfg.pod_files_limit,
        reason=refusal_file,
        skip=criu.stdio_paths(stdio),
    )
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
            try:
                criu.run(
                    criu.dump_args(
                        binary, root, images, cfg.logs, cfg.opts,
                        action_script=script, externals=criu.externals(stdio),
                    ),
                    cfg.logs / "dump.log",
                    CRIU_DUMP_TIMEOUT_S,
                )  # fmt: skip
            except criu.CriuError as exc:
                why = podfiles.refusal(refusal_file)  # the capture's own words (over the limit, unreadable)
                if why is not None:
                    raise RuntimeError(why) from exc
                raise
            timings["criu_dump_s"] = round(time.monotonic() - t, 3)
        finally:
            if frozen and cuda is not None:
                from thaw.runtime.cuda import CudaError

                t = time.monotonic()
                try:
                    cuda.thaw(cuda_pids)
                except CudaError as exc:
                    from thaw.runtime.blockers import cuda_restore_hint

                    why = f"the CUDA state could not be put back after the checkpoint: {exc}"
                    why += cuda_restore_hint(len(cuda_pids), exc.name)
                    raise WorkloadBroken(why) from exc
                timings["cuda_restore_s"] = round(time.monotonic() - t, 3)
    meta = {
        "format": META_FORMAT,
        "root_pid": root,
        "pids": pids,
        "cuda_pids": cuda_pids,
        "cmd": cmd,
        "stdio": stdio,
        "pod_files": podfiles.summary(images),
        "config": config,
        "tcp_established": cfg.opts.tcp_established,
        "gpu": gpu_layout(
            cuda_pids, fds_before, visible_gpu_minors(), {p: rank_env(p) for p in cuda_pids}, uuids
        ),
        "timings": timings,
    }
    if cfg.hooks is not None:
        meta["wake"] = to_json(cfg.hooks[1])  # a restored replica is as asleep as this server was: wake it
    (images / META_NAME).write_bytes(orjson.dumps(meta, option=orjson.OPT_SORT_KEYS))
    return meta


@contextlib.contextmanager
def _asleep(pair: tuple[Hook, Hook] | None, timings: dict[str, float]) -> Iterator[None]:
    """Run the body with the workload asleep (its sleep hook called, its wake hook after). Raises
    RuntimeError when it would not sleep, WorkloadBroken when it may be asleep and would not wake."""
    if pair is None:
        yield
        return
    sleep, wake = pair
    t = time.monotonic()
    failed = hooks.run(sleep)
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
            woke = hooks.run(wake)
            if woke is not None:
                raise WorkloadBroken(f"the server did not wake after the checkpoint: {woke.reason}")
            timings["wake_s"] = round(time.monotonic() - t, 3)


def estimate(root: int) -> Need:
    """What a checkpoint of the tree under ``root`` needs: its memory, and the GPU memory of the
    devices its processes hold open (the CUDA checkpoint's host copy), read before the lock."""
    pids = criu.tree(root)
    minors = sorted({m for p in pids for m in gpu_minors(criu.fd_targets(p).values())})
    return Need(tree_bytes=tree_bytes(pids), gpu_bytes=gpu_used_bytes(minors) if minors else 0)


def earlier_checkpoint(work: Path) -> dict[str, Any] | None:
    """The checkpoint record for this run when an earlier run in this pod got as far as a dump, else
    None. A dump that was never handed over (no request) is deleted: nothing will publish it."""
    marker = work / workdir.INPROGRESS
    if marker.exists() or marker.is_symlink():
        began = (workdir.read_json_or_none(marker) or {}).get("started", "an unknown time")
        if not (work / workdir.REQUEST).exists():
            shutil.rmtree(work / workdir.DUMP, ignore_errors=True)
        return {
            "status": "skipped",
            "reason": (
                f"an earlier checkpoint in this pod did not finish (started {began}): the container was "
                "killed during it, so it is not tried again (delete the pod to try again)"
            ),
        }
    done = workdir.read_json_or_none(work / workdir.DONE)
    if done is None:
        return None
    if done.get("stopped_workload"):
        first = str(done.get("first_reason") or done.get("reason", ""))
        return {
            "status": "skipped",
            "reason": f"an earlier checkpoint in this pod had to stop the workload: {first}",
            "first_reason": first,
            "stopped_workload": True,
        }
    status, why = done.get("status", "ended"), done.get("reason")
    return {
        "status": "skipped",
        "reason": f"this pod already took its checkpoint ({status}{': ' + str(why) if why else ''})",
    }


def _begin(work: Path, need: Need) -> Path:
    """The in-progress marker, then an empty ``<work>/dump/``. OSError when the marker cannot be
    written: no checkpoint without it (a killed one would be tried again on every restart)."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    workdir.write_json(work / workdir.INPROGRESS, {"started": started, "estimated_bytes": need.dump_bytes})
    for stale in (workdir.REQUEST, workdir.RESULT):
        (work / stale).unlink(missing_ok=True)
    images = work / workdir.DUMP
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(mode=0o700)
    return images


def _end(work: Path, record: dict[str, Any]) -> None:
    """The checkpoint has ended: the done marker replaces the in-progress one; the dump goes."""
    try:
        workdir.write_json(work / workdir.DONE, record)
        (work / workdir.INPROGRESS).unlink(missing_ok=True)
    except OSError as exc:  # the in-progress marker stays: a restart skips, which is what done means too
        log.warning("cannot mark the checkpoint done in %s: %s", work, exc)
    shutil.rmtree(work / workdir.DUMP, ignore_errors=True)


def _hand_over(images: Path, nbytes: int, cfg: CheckpointConfig, outcome: Outcome) -> None:
    """Publish (thaw-sidecar, or in-process) and record what became of it; in its own thread."""
    try:
        result = cfg.publisher.publish(images, nbytes)
    except Exception as exc:  # a publisher that raised: recorded, never raised
        result = {"status": "failed", "reason": f"publish: {exc}"}
    record = {**outcome.data.get("checkpoint", {}), **result}
    _end(cfg.work, record)  # first: whoever reads the outcome's end finds the markers settled
    outcome.update(checkpoint=record)
    (log.info if record.get("status") == "published" else log.error)("checkpoint: %s", record)


def checkpoint(
    root: int, cmd: list[str], sup: Supervisor, cfg: CheckpointConfig, outcome: Outcome
) -> threading.Thread | None:
    """Wait until ready, check, dump, and publish in the background. Never raises; never stops
    the server (but for WorkloadBroken)."""
    t0 = time.monotonic()
    outcome.update(checkpoint={"status": "waiting for ready"})
    why = wait_ready(cfg.ready, cfg.ready_timeout, alive=sup.alive)
    if why is not None:
        log.error("no checkpoint: %s", why)
        outcome.update(checkpoint={"status": "failed", "reason": why})
        return None
    ready_s = round(time.monotonic() - t0, 3)
    try:
        need = estimate(root)
    except OSError as exc:  # /proc unreadable: without an estimate, no dump
        log.error("no checkpoint: cannot size the tree: %s", exc)
        outcome.update(checkpoint={"status": "skipped", "reason": f"cannot size the tree: {exc}"})
        return None
    sized: dict[str, Any] = {"ready_s": ready_s, "estimated_bytes": need.dump_bytes}
    if need.gpu_bytes is None:
        sized["note"] = "the GPU state's size is unknown (no NVML): not counted in the estimate"
    try:
        why = cfg.publisher.room(need.dump_bytes) or refusal(need, room(cfg.work, None))
    except Exception as exc:  # a check that broke is no reason to stop the server: no checkpoint
        why = f"the checks before the dump failed: {type(exc).__name__}: {exc}"
    if why is not None:
        log.error("no checkpoint: %s", why)
        outcome.update(checkpoint={"status": "skipped", "reason": why, **sized})
        return None
    try:
        images = _begin(cfg.work, need)
    except OSError as exc:
        why = f"cannot mark the checkpoint in progress in {cfg.work}: {exc.strerror or exc}"
        log.error("no checkpoint: %s", why)
        outcome.update(checkpoint={"status": "skipped", "reason": why, **sized})
        return None
    outcome.update(checkpoint={"status": "dumping", **sized})
    try:
        meta = dump(root, cmd, images, cfg)
    except WorkloadBroken as exc:
        # Never half a server: a frozen tree would pass a TCP probe and answer nothing. Stopped,
        # the container restarts cold, and the done marker keeps the restart from trying again.
        log.error("checkpoint failed and the workload cannot go on; stopping it: %s", exc)
        record = {"status": "failed", "reason": str(exc), **sized, "stopped_workload": True}
        _end(cfg.work, record)
        outcome.update(checkpoint=record)
        sup.kill_tree(criu.tree(root) or [root])
        return None
    except Exception as exc:
        log.error("checkpoint failed, server keeps running: %s", exc)
        record = {"status": "failed", "reason": str(exc), **sized}
        _end(cfg.work, record)
        outcome.update(checkpoint=record)
        return None
    nbytes = sum(p.stat().st_size for p in images.rglob("*") if p.is_file())
    outcome.update(checkpoint={"status": "publishing", **sized, "dump_bytes": nbytes, **meta["timings"]})
    log.info("checkpoint taken in %s (%d bytes); publishing", meta["timings"], nbytes)
    # Publishing copies and hashes gigabytes: in a thread, so PID 1 goes back to reaping and
    # forwarding signals. It starts no processes, so it does not race the reaper.
    t = threading.Thread(
        target=_hand_over, args=(images, nbytes, cfg, outcome), name="thaw-publish", daemon=True
    )
    t.start()
    return t
