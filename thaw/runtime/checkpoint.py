"""Plan ``cold`` with ``--checkpoint on-ready``: once CMD is ready, lock and checkpoint CUDA in every
process that has CUDA state, dump the tree with CRIU leaving it running, restore and unlock CUDA,
then publish the images (signed) to the store and keep the node's copy in its cache. With sleep and
wake hooks the server is put to sleep around all of it. A failed checkpoint never stops the server;
it is logged and recorded (unless the CUDA state could not be put back: then the workload is
stopped, :class:`WorkloadBroken`).

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
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.manifest import EXEC_META_NAME
from thaw.runtime import criu, hooks
from thaw.runtime.gpu import gpu_layout, gpu_uuids_or_none, rank_env, visible_gpu_minors
from thaw.runtime.outcome import Outcome
from thaw.runtime.ready import ReadySpec, wait_ready
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
        from thaw.runtime.blockers import gpu_holders_refusal

        refused = gpu_holders_refusal(pids, cuda_pids, fds)  # before the lock: one line, with the fix
        if refused:
            raise RuntimeError(refused)
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
