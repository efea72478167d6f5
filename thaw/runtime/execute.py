"""``thaw exec -- CMD...``: the workload container's command (DESIGN.md, "The pod's life" 4 and 5).

It reads the plan ``thaw fetch`` left and, as PID 1 of the container (:mod:`thaw.runtime.supervisor`),
runs the workload: restored from the plan's snapshot (:mod:`thaw.runtime.restore`), or started cold,
and then checkpointed once it is ready with ``--checkpoint on-ready``
(:mod:`thaw.runtime.checkpoint`). What happened goes to the outcome file
(:mod:`thaw.runtime.outcome`). It exits with the workload's status. This module holds the command:
its flags checked, the pieces put together.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from thaw.contract.facts import facts_path
from thaw.contract.hooks import HookError, resolve_pair
from thaw.contract.plan import read_plan
from thaw.errors import UsageError
from thaw.runtime import criu, workdir
from thaw.runtime.checkpoint import CheckpointConfig, checkpoint, earlier_checkpoint
from thaw.runtime.outcome import Outcome, pod_identity
from thaw.runtime.publish import LocalPublisher, Publisher, SidecarPublisher, Target
from thaw.runtime.ready import ReadySpec, ReadySpecError, parse_ready
from thaw.runtime.restore import restore
from thaw.runtime.supervisor import Supervisor, become_subreaper, spawn
from thaw.runtime.workdir import ReadyGate

log = logging.getLogger("thaw.exec")


def work_dir(args: argparse.Namespace) -> Path:
    """The work emptyDir (``--work``; else beside ``--outcome``, else beside ``--plan``): the outcome,
    CRIU's logs, the ready file, the dump and its markers. A temporary directory when that is not
    writable (a read-only plan volume must not turn into a failed restore)."""
    work: Path | None = args.work or (args.outcome.parent if args.outcome else None)
    if work is None and args.plan is not None:
        work = args.plan.parent
    if work is not None:
        with contextlib.suppress(OSError):
            work.mkdir(parents=True, exist_ok=True)
        if os.access(work, os.W_OK):
            return work
        log.warning("%s is not writable: CRIU's logs go to a temporary directory", work)
    return Path(tempfile.mkdtemp(prefix="thaw-exec-"))


def facts_file(args: argparse.Namespace) -> Path | None:
    """``--facts``, else the facts thaw-fetch wrote beside the plan (so every Thaw container of the
    pod sees the same facts), else None (detected)."""
    if args.facts is not None:
        return Path(args.facts)
    if args.plan is not None and facts_path(args.plan).is_file():
        return facts_path(args.plan)
    return None


def workload_command(raw: list[str]) -> list[str]:
    cmd = list(raw)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("no workload command: use thaw exec [flags] -- CMD ARGS...")
    return cmd


def _local_publisher(args: argparse.Namespace) -> LocalPublisher:
    """``--store`` given (run by hand): publish in-process, as ``--name``/``--workload``, signed
    with ``--key`` (unsigned without one)."""
    from thaw.snapshot.cache import DEFAULT_NAMESPACE
    from thaw.snapshot.nodefacts import node_facts
    from thaw.snapshot.stores import store_from_args

    missing = [f for f, v in (("--name", args.name), ("--workload", args.workload)) if not v]
    if missing:
        raise UsageError(f"--checkpoint on-ready with --store needs {', '.join(missing)}")
    try:
        store = store_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    target = Target(
        store=store,
        name=args.name,
        workload=args.workload,
        namespace=os.environ.get("THAW_POD_NAMESPACE") or DEFAULT_NAMESPACE,
        key=args.key,
        facts=node_facts(facts_file(args)),
        cache=args.cache,
    )
    return LocalPublisher(target)


def checkpoint_config(
    args: argparse.Namespace, opts: criu.CriuOptions, logs: Path, work: Path
) -> tuple[CheckpointConfig | None, dict[str, Any] | None]:
    """The checkpoint's configuration, or None and (where one was asked for) why there is none."""
    if args.checkpoint != "on-ready":
        return None, None
    if not args.ready:
        # A pod without an HTTP or TCP readinessProbe: the webhook could set no THAW_READY. The
        # workload runs; only the checkpoint is off (issue 10.6: it used to exit 2 and crash-loop).
        why = (
            "no readiness check: --checkpoint on-ready needs --ready (THAW_READY, which the webhook "
            "takes from the container's httpGet or tcpSocket readinessProbe); the workload runs "
            "without a checkpoint"
        )
        log.warning("%s", why)
        return None, {"status": "skipped", "reason": why}
    try:
        ready = parse_ready(args.ready)
        hooks = resolve_pair(args.sleep, args.wake, args.ready, ("--sleep", "--wake"))
    except (ReadySpecError, HookError) as exc:
        raise UsageError(str(exc)) from exc
    publisher: Publisher = _local_publisher(args) if args.store else SidecarPublisher(work)
    cfg = CheckpointConfig(
        ready=ready,
        ready_timeout=float(args.ready_timeout),
        work=work,
        publisher=publisher,
        opts=opts,
        logs=logs,
        hooks=hooks,
        pod_files_limit=args.pod_files_limit,
    )
    return cfg, None


def run(args: argparse.Namespace) -> int:
    cmd = workload_command(args.cmd)
    work = work_dir(args)
    outcome_path: Path = args.outcome or work / workdir.OUTCOME
    logs = work
    opts = criu.CriuOptions(
        network_lock=criu.detect_network_lock(),
        tcp_established=bool(args.tcp_established),
        extra=criu.detect_mode_flags(),  # --unprivileged without CAP_SYS_ADMIN, as in a pod
    )
    cfg, not_checkpointing = checkpoint_config(args, opts, logs, work)
    if cfg is not None:
        earlier = earlier_checkpoint(work)  # once per pod: a restart does not checkpoint again
        if earlier is not None:
            log.error("no checkpoint in this pod: %s (delete the pod to try again)", earlier["reason"])
            cfg, not_checkpointing = None, earlier
    ready: ReadySpec | None = None
    if args.ready:
        try:
            ready = parse_ready(args.ready)
        except ReadySpecError as exc:
            raise UsageError(str(exc)) from exc
    gate = ReadyGate(work / workdir.READY, stopped=args.ready_gate == "stopped")
    gate.reset()
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
    if not_checkpointing is not None and plan["action"] == "cold":
        outcome.update(checkpoint=not_checkpointing)
    restored = False
    if plan["action"] == "restore":
        restored = restore(
            plan,
            cmd=cmd,
            sup=sup,
            opts=opts,
            logs=logs,
            ready=ready,
            outcome=outcome,
            gate=gate,
            criu_stock=bool(args.criu_stock),
        )
    else:
        log.info("cold start: %s", plan.get("reason"))
        outcome.update(result="cold", reason=plan.get("reason"))
    publisher: threading.Thread | None = None
    if not restored:
        proc = spawn(cmd, args.pid_floor if cfg is not None else None)
        sup.adopt(proc.pid)
        gate.open()  # a cold start: nothing of Thaw holds readiness back (the server's probe does)
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
