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

from thaw.contract.hooks import HookError, resolve_pair
from thaw.contract.plan import read_plan
from thaw.errors import UsageError
from thaw.runtime import criu
from thaw.runtime.checkpoint import CheckpointConfig, checkpoint
from thaw.runtime.outcome import Outcome, checkpoint_blocked, pod_identity, read_outcome
from thaw.runtime.ready import ReadySpec, ReadySpecError, parse_ready
from thaw.runtime.restore import restore
from thaw.runtime.supervisor import Supervisor, become_subreaper, spawn

log = logging.getLogger("thaw.exec")


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
