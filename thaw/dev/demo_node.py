"""The node steps of ``thaw demo``: this machine plays GPU node ``gpu-local`` and runs the runtime for
real, with CRIU, on a CPU stand-in server (thaw/dev/standin.py: warm-up work and memory, then HTTP).

1. ``cold_step``: the first replica finds no snapshot. ``thaw fetch`` (the ``thaw-fetch`` init
   container) writes a cold plan; ``thaw exec`` (the wrapper) starts the server, waits for its
   readiness URL, checkpoints it with CRIU, publishes the signed snapshot to the store and keeps a
   copy in the node cache. ``thaw agent --once`` then prints the node's ``thaw.dev/facts`` and
   ``thaw.dev/cache`` annotations, which the extender step reads as ``gpu-local``'s.
2. ``restore_step``: a replica the extender placed on ``gpu-local`` runs ``thaw fetch`` + ``thaw exec``
   again, in a fresh network namespace and process tree (:mod:`thaw.dev.sandbox`), and is restored.

Both pods get exactly the ``THAW_*`` environment the webhook injected into the mutated pod (the
``thaw-fetch`` init container's and the target container's), with the pod's mount paths mapped to
directories under the demo's work directory, and exactly the capabilities the webhook added (on top
of a container runtime's defaults, through setpriv). The workload command is the stand-in's, not
vLLM's; the snapshot name and ``thaw.dev/workload`` are the webhook's. Node facts come from
``--facts`` (``THAW_FACTS``): this machine's detected arch, kernel and CRIU, with a simulated GPU, so
that the simulated cluster's nodes can share the snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thaw.contract.annotations import NODE_CACHE
from thaw.dev.sandbox import STANDIN, Netns, Pod, missing_prerequisites, read_json, with_caps

if TYPE_CHECKING:
    from thaw.dev.demo import DemoContext

LOCAL_NODE = "gpu-local"
PORT = 8000  # the vLLM pod's containerPort: its readinessProbe becomes THAW_READY
WARMUP_S = "4"  # the stand-in's start: what a real server spends importing, loading, compiling
MEM_MB = "128"  # memory the snapshot carries
SIMULATED_GPU = {"gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 8}, "driver": "580.159.04"}
BUDGET = 10 * 2**30
READY_TIMEOUT_S = 60.0
PUBLISH_TIMEOUT_S = 90.0

# The pod's mount paths (webhook/patches.py) -> where this "node" keeps them.
NODE_PATHS = {
    "/var/lib/thaw/cache": "cache",  # hostPath: shared by the node's pods
    "/var/lib/thaw/store": "store",  # the store (a hostPath or a PVC)
    "/etc/thaw/trust": "trust",  # the trust ConfigMap
    "/etc/thaw/key": "keys",  # the signing-key Secret
}
POD_PATHS = {
    "/run/thaw": "run",  # the plan emptyDir: one per pod
    "/thaw": "tools",  # the tools emptyDir that the thaw-tools init container fills
}


def install_tools(pod_dir: Path) -> None:
    """What the ``thaw-tools`` init container does for a pod: put CRIU under the pod's ``/thaw/bin``
    (here a link to this machine's CRIU 4.2, as ``make criu`` installed it)."""
    from thaw.runtime.criu import find_criu

    bin_dir = pod_dir / "tools" / "bin"
    bin_dir.mkdir(parents=True)
    criu = find_criu({k: v for k, v in os.environ.items() if k != "THAW_CRIU"})
    (bin_dir / "criu").symlink_to(Path(criu).resolve())


@dataclass
class PodRun:
    """What one pod did: its plan, its outcome file, its first answer and its timings."""

    name: str
    plan: dict[str, Any]
    outcome: dict[str, Any]
    answer: dict[str, Any] | None
    fetch_s: float
    ready_s: float | None  # from the start of thaw fetch to the first answer of the server
    log: str


def map_env(
    env: list[dict[str, Any]], node_dir: Path, pod_dir: Path, fields: dict[str, str]
) -> dict[str, str]:
    """A container's ``env`` as this machine runs it: ``THAW_*`` only, the pod's mount paths mapped
    into ``node_dir``/``pod_dir``, downward-API values from ``fields`` (fieldPath -> value). Pure."""
    out: dict[str, str] = {}
    for e in env:
        name = e["name"]
        if not name.startswith("THAW_"):
            continue
        if "value" in e:
            value = str(e["value"])
            for prefix, sub in NODE_PATHS.items():
                if value == prefix or value.startswith(prefix + "/"):
                    value = str(node_dir / sub) + value[len(prefix) :]
            for prefix, sub in POD_PATHS.items():
                if value == prefix or value.startswith(prefix + "/"):
                    value = str(pod_dir / sub) + value[len(prefix) :]
            out[name] = value
        else:
            path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            out[name] = fields.get(path, "")
    return out


def pod_containers(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mutated pod's ``thaw-fetch`` init container and its target container (the one whose command
    the webhook wrapped with ``thaw exec``)."""
    fetch = next(c for c in pod["spec"]["initContainers"] if c["name"] == "thaw-fetch")
    target = next(c for c in pod["spec"]["containers"] if c.get("command", [""])[1:2] == ["exec"])
    return fetch, target


def node_facts_file(path: Path) -> dict[str, Any]:
    """This machine's detected facts with the simulated GPU (there is none to detect here)."""
    from thaw.snapshot.nodefacts import node_facts

    facts: dict[str, Any] = {**node_facts(None), **SIMULATED_GPU}
    path.write_text(json.dumps(facts))
    return facts


def _cli(
    argv: list[str], env: dict[str, str], netns: Netns | None = None
) -> subprocess.CompletedProcess[str]:
    """``thaw ARGV`` as a container would run it: configured by its environment only."""
    from thaw.dev.sandbox import REPO

    prefix = ["ip", "netns", "exec", netns.name] if netns is not None else []
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "thaw", *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        timeout=300,
    )


def workload_cmd() -> list[str]:
    return ["python3", str(STANDIN), str(PORT), "--warmup", WARMUP_S, "--mem-mb", MEM_MB]


def run_pod(ctx: DemoContext, pod: dict[str, Any], name: str, wait_publish: bool) -> PodRun:
    """One replica of ``pod`` on this node: ``thaw fetch`` then ``thaw exec`` in a fresh sandbox, until
    its server answers (and, with ``wait_publish``, until its snapshot is published). Stops it."""
    fetch_c, target = pod_containers(pod)
    node_dir, pod_dir = ctx.workdir / "node", ctx.workdir / name
    (pod_dir / "run").mkdir(parents=True)
    install_tools(pod_dir)
    fields = {
        "metadata.name": name,
        "metadata.namespace": "llm-serving",
        "metadata.uid": str(uuid.uuid4()),
        "spec.nodeName": LOCAL_NODE,
    }
    node_env = {"THAW_FACTS": str(node_dir / "facts.json")}  # --facts: no GPU to detect here
    fetch_env = {**map_env(fetch_c.get("env", []), node_dir, pod_dir, fields), **node_env}
    exec_env = {**map_env(target.get("env", []), node_dir, pod_dir, fields), **node_env}
    caps = [c.lower() for c in target["securityContext"]["capabilities"]["add"]]
    ready_url = exec_env.get("THAW_READY", f"http://127.0.0.1:{PORT}/health")
    netns = Netns("thaw-demo")
    sandbox: Pod | None = None
    try:
        shown = " ".join(f"{k}={v}" for k, v in sorted(fetch_env.items()))
        ctx.say(f"    $ thaw fetch   # the thaw-fetch init container, configured by its env: {shown}")
        t0 = time.monotonic()
        res = _cli(["fetch"], fetch_env, netns)
        fetch_s = time.monotonic() - t0
        if res.returncode != 0:
            raise RuntimeError(f"thaw fetch exited {res.returncode}: {res.stderr.strip()}")
        plan = read_json(Path(fetch_env["THAW_PLAN"]))
        ctx.say(f"    thaw fetch ({fetch_s:.2f} s): {res.stderr.strip().splitlines()[-1]}")
        ctx.say(
            f"    $ thaw exec -- {' '.join(workload_cmd())}   # the wrapper, in the netns {netns.name}, "
            f"PID 1 of a new PID namespace; env: THAW_PLAN THAW_READY={ready_url} THAW_CHECKPOINT="
            f"{exec_env.get('THAW_CHECKPOINT')} and the rest of {len(exec_env)} THAW_* variables"
        )
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("THAW_")}, **exec_env}
        sandbox = Pod(netns, [], workload_cmd(), env=env, wrap=with_caps(caps))
        answer: dict[str, Any] | None = None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while answer is None and time.monotonic() < deadline and sandbox.proc.poll() is None:
            answer = netns.http("GET", ready_url, timeout=1.0)
            if answer is None:
                time.sleep(0.05)
        ready_s = time.monotonic() - t0 if answer is not None else None
        outcome_path = Path(exec_env["THAW_PLAN"]).parent / "outcome.json"
        outcome = read_json(outcome_path)
        if wait_publish and answer is not None:
            deadline = time.monotonic() + PUBLISH_TIMEOUT_S
            while time.monotonic() < deadline:
                outcome = read_json(outcome_path)
                if outcome.get("checkpoint", {}).get("status") in ("published", "failed"):
                    break
                time.sleep(0.1)
        return PodRun(name, plan, outcome, answer, fetch_s, ready_s, "")
    finally:
        if sandbox is not None:
            sandbox.stop()
            log = sandbox.output
            if log and (sandbox.proc.returncode not in (0, -15, 143)):
                ctx.say(
                    "    thaw exec's output:\n" + "\n".join("      " + ln for ln in log.splitlines()[-20:])
                )
        netns.delete()


def _prepare_node(ctx: DemoContext) -> dict[str, Any]:
    """Signing keys, trust, store and cache directories, facts: what the node and cluster provide."""
    node_dir = ctx.workdir / "node"
    for sub in ("store", "cache"):  # the store volume and the node cache's hostPath
        (node_dir / sub).mkdir(parents=True)
    res = _cli(["keys", "generate", "--out", str(node_dir / "keys")], {})
    if res.returncode != 0:
        raise RuntimeError(f"thaw keys generate: {res.stderr.strip()}")
    (node_dir / "trust").mkdir()
    shutil.copy(node_dir / "keys" / "signing.pub", node_dir / "trust" / "signing.pub")
    facts = node_facts_file(node_dir / "facts.json")
    ctx.say(f"  $ thaw keys generate --out {node_dir / 'keys'}   # key id {res.stdout.strip()}")
    ctx.say(f"  node facts (--facts): {json.dumps(facts, sort_keys=True)}")
    return facts


def agent_once(ctx: DemoContext) -> dict[str, str]:
    """``thaw agent --once`` without ``--node``: the annotations it would patch onto the Node."""
    node_dir = ctx.workdir / "node"
    argv = ["agent", "--once", "--cache", str(node_dir / "cache"), "--budget", str(BUDGET)]
    argv += ["--facts", str(node_dir / "facts.json")]
    ctx.say(f"  $ thaw {' '.join(argv)}")
    res = _cli(argv, {})
    if res.returncode != 0:
        raise RuntimeError(f"thaw agent --once exited {res.returncode}: {res.stderr.strip()}")
    annotations: dict[str, str] = json.loads(res.stdout.strip().splitlines()[-1])
    inv = json.loads(annotations[NODE_CACHE])
    for s in inv.get("snapshots", []):
        ctx.say(
            f"    {NODE_CACHE}: {s['name']} {s['id'][:19]}… {s['bytes'] / 1e6:.0f} MB tier={s['tier']} "
            f"compat={s['compat']}"
        )
    if not inv.get("snapshots"):
        ctx.say(f"    {NODE_CACHE}: no snapshots; free {inv.get('free_bytes', 0) / 1e9:.0f} GB")
    # what it would post on this node's pods (kubectl describe pod), from thaw exec's outcome copies
    for line in res.stderr.splitlines():
        if "event (dry run): " in line:
            ctx.say(f"    event: {line.split('event (dry run): ', 1)[1]}")
    return annotations


def cold_step(ctx: DemoContext) -> None:
    """The first replica on this node: cold start, checkpoint on ready, publish; then the agent."""
    if not ctx.pods:
        ctx.record(
            "node", "cold start + checkpoint", "skipped", "no mutated pod from the webhook step", ok=False
        )
        return
    pod = next(iter(ctx.pods.values()))
    facts = _prepare_node(ctx)
    ctx.facts = facts
    why = missing_prerequisites()
    if why is not None:
        ctx.say(f"  SKIPPED the real runtime (cold start, checkpoint, restore): {why}")
        ctx.record("node", "cold start + checkpoint", "skipped", why)
        ctx.node_annotations = agent_once(ctx)
        return
    _, target = pod_containers(pod)
    ctx.say(
        f"  pod qwen-0 on {LOCAL_NODE}: the webhook's THAW_* env, capabilities "
        f"{', '.join(target['securityContext']['capabilities']['add'])}; workload: {' '.join(workload_cmd())}"
    )
    run = run_pod(ctx, pod, "qwen-0", wait_publish=True)
    ctx.cold = run
    ck = run.outcome.get("checkpoint", {})
    ctx.say(f"    plan: {run.plan.get('action')} ({run.plan.get('reason', '')})")
    ready = f"{run.ready_s:.2f} s" if run.ready_s is not None else "never"
    ctx.say(f"    thaw exec: cold start; server ready after {ready} (fetch included)")
    ctx.say(
        f"    checkpoint: {ck.get('status')} {ck.get('snapshot', '')[:19]} {ck.get('bytes', 0) / 1e6:.0f} MB "
        f"(asleep: sleep {ck.get('sleep_s', '-')} s, criu dump {ck.get('criu_dump_s', '-')} s, "
        f"wake {ck.get('wake_s', '-')} s; publish {ck.get('publish_s', '-')} s) "
        f"{ck.get('reason', '')}"
    )
    ok = run.answer is not None and ck.get("status") == "published"
    ctx.record("node", "qwen-0: fetch", run.plan.get("action", "?"), run.plan.get("reason", ""))
    ctx.record("node", "qwen-0: exec (cold)", f"ready {ready}", f"checkpoint {ck.get('status')}", ok=ok)
    ctx.node_annotations = agent_once(ctx)


def restore_step(ctx: DemoContext) -> None:
    """A replica the extender placed on this node: restored from the snapshot the first one took."""
    here = [p for p in ctx.placements if p.node == LOCAL_NODE]
    if ctx.cold is None or not ctx.pods:
        ctx.say("  SKIPPED: no snapshot was taken on this machine (see the node step)")
        ctx.record("restore", "restore on this machine", "skipped", "no snapshot taken here")
        return
    if not here:
        ctx.say(f"  SKIPPED: the extender placed no pod on {LOCAL_NODE}")
        ctx.record(
            "restore", "restore on this machine", "skipped", f"no pod placed on {LOCAL_NODE}", ok=False
        )
        return
    name = here[0].pod
    ctx.say(f"  pod {name} bound to {LOCAL_NODE} ({here[0].tier}): fresh network namespace and PID tree")
    run = run_pod(ctx, next(iter(ctx.pods.values())), f"restore-{name}", wait_publish=False)
    ctx.restored = run
    ready = f"{run.ready_s:.2f} s" if run.ready_s is not None else "never"
    ctx.say(f"    plan: {run.plan.get('action')} {run.plan.get('snapshot', run.plan.get('reason', ''))[:40]}")
    ctx.say(
        f"    thaw exec: {run.outcome.get('result')} {run.outcome.get('reason') or ''} "
        f"timings {run.outcome.get('timings', {})}; server ready after {ready} (fetch included)"
    )
    cold = ctx.cold.answer or {}
    same = run.answer is not None and run.answer.get("digest") == cold.get("digest")
    ctx.say(
        f"    state carried over: warm-up digest {(run.answer or {}).get('digest', '')[:12]} "
        f"{'==' if same else '!='} {cold.get('digest', '')[:12]}, PID {(run.answer or {}).get('pid')} "
        f"(CRIU restores PIDs)"
    )
    restored = run.outcome.get("result") == "restored"
    agent_once(ctx)  # its events now include the restore's (the annotations the extender saw stay)
    ctx.record("restore", f"{name}: fetch", run.plan.get("action", "?"), run.plan.get("snapshot", ""))
    ctx.record(
        "restore",
        f"{name}: exec",
        f"{run.outcome.get('result')} {ready}",
        run.outcome.get("reason") or f"state {'kept' if same else 'LOST'}",
        ok=restored and same,
    )
