"""The node steps of ``thaw demo``: this machine plays GPU node ``gpu-local`` and runs the runtime for
real, with CRIU, on a CPU stand-in server (thaw/dev/standin.py: warm-up work and memory, then HTTP).

Each pod runs as the webhook injected it (the mutated pod the webhook step left in ``ctx.pods``): its
containers' commands, environment and mounts are read from the injection, with the pod's paths
mapped to directories under the demo's work directory (``NODE_PATHS``, ``POD_PATHS``):

1. ``thaw-tools``: ``thaw install-runtime``, every capability dropped, copies the runtime bundle
   once into the node's runtime directory and links it into the pod's tools directory (``/thaw/rt``).
   The Thaw image's bundle (``/opt/thaw``) is played by :func:`make_bundle`: this repository's thaw
   on this Python, with this machine's CRIU.
2. ``thaw-fetch``: ``thaw fetch`` writes the plan (cold: no snapshot yet; later: restore).
3. ``thaw-sidecar``: ``thaw sidecar``, started before the workload and stopped after it (a native
   sidecar), relays the outcome into the node cache and publishes the dump ``thaw exec`` hands it,
   signed with the key only it gets.
4. The workload: ``/thaw/rt/bin/thaw exec -- CMD`` with the stand-in's command, in a fresh
   container (:mod:`thaw.dev.sandbox`: its own network, PID and mount namespaces, fresh tmpfs over
   its writable places) that sees of the node only its volumes: the plan, its own snapshots and the
   runtime read-only, its work directory read-write; everything else of the node (the cache, the
   store, the key) is hidden. It gets exactly the capabilities the webhook added.

``cold_step`` runs the first replica (cold start, checkpoint on ready, publish), then ``thaw agent
--once`` prints the node's ``thaw.dev/facts`` and ``thaw.dev/cache`` annotations, which the extender
step reads as ``gpu-local``'s. ``restore_step`` runs a replica the extender placed on ``gpu-local``:
restored. Node facts come from ``--facts`` (``THAW_FACTS``, for ``thaw fetch`` and the agent): this
machine's detected arch, kernel and CRIU, with a simulated GPU, so that the simulated cluster's
nodes can share the snapshot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thaw.contract.annotations import NODE_CACHE
from thaw.dev.sandbox import REPO, STANDIN, Netns, Pod, missing_prerequisites, read_json, with_caps
from webhook import patches as P

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
STOP_TIMEOUT_S = 15.0
FINAL_CHECKPOINT = ("published", "failed", "skipped", "refused")
# `thaw agent --once` without --node logs the Events it would post (thaw/node/agent.py).
DRY_RUN_EVENT = re.compile(r"event \(dry run[^)]*\): (.*)$")

# The pod's paths (webhook/patches.py) -> where this "node" keeps them: the node's (hostPath volumes,
# the store, the Secrets, the Thaw image's runtime) and the pod's own (its emptyDirs).
NODE_PATHS = {
    P.IMAGE_RUNTIME: "bundle",  # /opt/thaw in Thaw's image: make_bundle()
    P.RUNTIME_DIR: "runtime",  # hostPath: the node's runtime copies
    P.CACHE_DIR: "cache",  # hostPath: shared by the node's pods
    P.STORE_DIR: "store",  # the store (a hostPath or a PVC)
    P.TRUST_DIR: "trust",  # the trust Secret
    P.KEY_DIR: "keys",  # the signing-key Secret
}
POD_PATHS = {
    "/run/thaw": "run",  # the plan, work and sidecar-state emptyDirs: one per pod
    P.TOOLS_DIR: "tools",  # the tools emptyDir that thaw-tools links the runtime into
}


def map_path(value: str, node_dir: Path, pod_dir: Path) -> str:
    """A path inside the pod as this machine keeps it (pure): the longest mapped prefix wins."""
    table = [(k, node_dir / v) for k, v in NODE_PATHS.items()] + [
        (k, pod_dir / v) for k, v in POD_PATHS.items()
    ]
    for prefix, where in sorted(table, key=lambda kv: -len(kv[0])):
        if value == prefix or value.startswith(prefix + "/"):
            return str(where) + value[len(prefix) :]
    return value


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
            out[name] = map_path(str(e["value"]), node_dir, pod_dir)
        else:
            path = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
            out[name] = fields.get(path, "")
    return out


@dataclass(frozen=True)
class Injected:
    """The containers the webhook gave the pod, by role."""

    tools: dict[str, Any]
    fetch: dict[str, Any]
    sidecar: dict[str, Any]
    target: dict[str, Any]


def pod_containers(pod: Mapping[str, Any]) -> Injected:
    """The mutated pod's Thaw init containers and its target container (the one whose command the
    webhook wrapped with ``thaw exec``)."""
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    target = next(c for c in pod["spec"]["containers"] if c.get("command", [""])[1:2] == ["exec"])
    return Injected(init[P.TOOLS_CONTAINER], init[P.FETCH_CONTAINER], init[P.SIDECAR_CONTAINER], target)


def volume_binds(container: Mapping[str, Any], node_dir: Path, pod_dir: Path) -> list[tuple[str, bool]]:
    """The container's Thaw volumes as (path on this machine, read-only), from its volumeMounts (pure)."""
    return [
        (map_path(m["mountPath"], node_dir, pod_dir), bool(m.get("readOnly")))
        for m in container.get("volumeMounts") or ()
        if str(m.get("name", "")).startswith("thaw-")
    ]


def make_bundle(where: Path) -> Path:
    """The Thaw image's runtime bundle (``/opt/thaw``) as this machine has it: ``bin/thaw`` runs this
    repository's thaw on this Python, ``bin/criu`` is this machine's CRIU (``make criu``), and
    ``BUNDLE_ID`` names it, as scripts/build-runtime makes the real one (which the image carries)."""
    from thaw.runtime.criu import find_criu
    from thaw.runtime.install import write_bundle_id

    (where / "bin").mkdir(parents=True)
    code = f"import sys; sys.path.insert(0, {json.dumps(str(REPO))}); sys.argv[0] = 'thaw'; "
    code += "from thaw.cli import main; sys.exit(main())"
    wrapper = where / "bin" / "thaw"
    wrapper.write_text(
        "#!/bin/sh\n# thaw demo's stand-in for the Thaw image's /opt/thaw (scripts/build-runtime builds it)\n"
        f'exec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n'
    )
    wrapper.chmod(0o755)
    criu = find_criu({k: v for k, v in os.environ.items() if k != "THAW_CRIU"})
    (where / "bin" / "criu").symlink_to(Path(criu).resolve())
    write_bundle_id(where)
    return where


@dataclass
class PodRun:
    """What one pod did: its plan, its outcome file, its first answer and its timings."""

    name: str
    plan: dict[str, Any]
    outcome: dict[str, Any]
    answer: dict[str, Any] | None
    fetch_s: float
    ready_s: float | None  # from the start of thaw-tools to the first answer of the server
    log: str


def node_facts_file(path: Path) -> dict[str, Any]:
    """This machine's detected facts with the simulated GPU (there is none to detect here)."""
    from thaw.snapshot.nodefacts import node_facts

    facts: dict[str, Any] = {**node_facts(None), **SIMULATED_GPU}
    path.write_text(json.dumps(facts))
    return facts


def _run(
    cmd: Sequence[str], env: dict[str, str], netns: Netns | None = None
) -> subprocess.CompletedProcess[str]:
    """A Thaw container's command, configured by its environment only."""
    prefix = ["ip", "netns", "exec", netns.name] if netns is not None else []
    clean = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    return subprocess.run(
        [*prefix, *cmd],
        capture_output=True,
        text=True,
        check=False,
        env={**clean, "PYTHONPATH": str(REPO), **env},
        timeout=300,
    )


def _cli(argv: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``thaw ARGV`` (this repository's) on this machine."""
    return _run([sys.executable, "-m", "thaw", *argv], env)


def _no_caps(security: Mapping[str, Any] | None) -> list[str]:
    """The prefix that drops every capability, where the container's securityContext drops ALL."""
    drop = ((security or {}).get("capabilities") or {}).get("drop") or []
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"] if "ALL" in drop else []


def _last_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = res.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def workload_cmd() -> list[str]:
    return ["python3", str(STANDIN), str(PORT), "--warmup", WARMUP_S, "--mem-mb", MEM_MB]


class Sidecar:
    """``thaw-sidecar`` of one pod: started before the workload, stopped (SIGTERM) after it."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, env={**clean, "PYTHONPATH": str(REPO), **env}, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def run_pod(ctx: DemoContext, pod: dict[str, Any], name: str, wait_publish: bool) -> PodRun:
    """One replica of ``pod`` on this node, its containers as the webhook injected them (module
    doc), until its server answers (and, with ``wait_publish``, until its snapshot is published).
    Stops it."""
    c = pod_containers(pod)
    node_dir, pod_dir = ctx.workdir / "node", ctx.workdir / name
    pod_dir.mkdir(parents=True)
    namespace = next(e["value"] for e in c.fetch["env"] if e["name"] == P.ENV_NAMESPACE)
    fields = {
        "metadata.name": name,
        "metadata.namespace": namespace,
        "metadata.uid": str(uuid.uuid4()),
        "spec.nodeName": LOCAL_NODE,
    }

    def env(container: Mapping[str, Any], **extra: str) -> dict[str, str]:
        return {**map_env(container.get("env", []), node_dir, pod_dir, fields), **extra}

    def command(container: Mapping[str, Any]) -> list[str]:
        return [map_path(str(a), node_dir, pod_dir) for a in container["command"]]

    # What kubelet makes before any container starts: the pod's emptyDirs (empty, for every pod)
    # and its DirectoryOrCreate hostPaths (the pod's own snapshot directory among them).
    for path, _ in volume_binds(c.sidecar, node_dir, pod_dir) + volume_binds(c.tools, node_dir, pod_dir):
        if path.startswith(str(pod_dir)):
            Path(path).mkdir(parents=True, exist_ok=True)
    for volume in pod["spec"]["volumes"]:
        host = volume.get("hostPath") or {}
        if host.get("type") == "DirectoryOrCreate":
            os.makedirs(map_path(host["path"], node_dir, pod_dir), mode=0o755, exist_ok=True)
    facts = {"THAW_FACTS": str(node_dir / "facts.json")}  # --facts: no GPU to detect here
    netns = Netns("thaw-demo")
    sandbox: Pod | None = None
    sidecar: Sidecar | None = None
    try:
        t0 = time.monotonic()
        tools_env = env(c.tools, THAW_BUNDLE=str(node_dir / "bundle"))
        ctx.say(f"    $ thaw install-runtime   # thaw-tools: no capabilities; {_names(tools_env)}")
        res = _run([*_no_caps(c.tools.get("securityContext")), *command(c.tools)], tools_env)
        if res.returncode != 0:
            raise RuntimeError(f"thaw install-runtime exited {res.returncode}: {res.stderr.strip()}")
        linked = _last_line(res).removeprefix("thaw install-runtime: ")
        ctx.say(f"      {P.RUNTIME_LINK} -> {linked.split(': ', 1)[-1]}")

        fetch_env = env(c.fetch, **facts)
        ctx.say(f"    $ thaw fetch   # thaw-fetch: store, cache, trust; writes the plan; {_names(fetch_env)}")
        t_fetch = time.monotonic()
        res = _run(command(c.fetch), fetch_env, netns)
        fetch_s = time.monotonic() - t_fetch
        if res.returncode != 0:
            raise RuntimeError(f"thaw fetch exited {res.returncode}: {res.stderr.strip()}")
        plan = read_json(Path(fetch_env["THAW_PLAN"]))
        ctx.say(f"      {_last_line(res).removeprefix('thaw fetch: ')} ({fetch_s:.2f} s)")

        sidecar_env = env(c.sidecar)
        ctx.say(
            "    $ thaw sidecar &   # thaw-sidecar: the only container with the store, the cache and the key"
        )
        sidecar = Sidecar(command(c.sidecar), sidecar_env, pod_dir / "sidecar.log")

        exec_env = env(c.target)
        thaw_bin, *wrapped = command(c.target)
        assert wrapped[:2] == ["exec", "--"], c.target["command"]
        binds = volume_binds(c.target, node_dir, pod_dir)
        caps = [cap.lower() for cap in c.target["securityContext"]["capabilities"]["add"]]
        ready_url = exec_env.get("THAW_READY", f"http://127.0.0.1:{PORT}/health")
        mounts = ", ".join(
            f"{m['mountPath']} ({'ro' if m.get('readOnly') else 'rw'})"
            for m in c.target.get("volumeMounts") or ()
            if str(m.get("name", "")).startswith("thaw-")
        )
        ctx.say(f"    $ {P.THAW_BIN} exec -- {' '.join(_shown_cmd(workload_cmd()))}")
        ctx.say(f"      the workload: PID 1 of a fresh container (network namespace {netns.name})")
        ctx.say(f"      of the node it sees only {mounts}")
        ctx.say(
            f"      THAW_READY={ready_url} THAW_CHECKPOINT={exec_env.get('THAW_CHECKPOINT')} "
            f"(+{len(exec_env) - 2} more THAW_* variables)"
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
        sandbox = Pod(
            netns,
            [],
            workload_cmd(),
            env={**base, **exec_env},
            wrap=with_caps(caps),
            thaw=[thaw_bin],
            hide=[ctx.workdir],
            binds=binds,
        )
        answer: dict[str, Any] | None = None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while answer is None and time.monotonic() < deadline and sandbox.proc.poll() is None:
            answer = netns.http("GET", ready_url, timeout=1.0)
            if answer is None:
                time.sleep(0.05)
        ready_s = time.monotonic() - t0 if answer is not None else None
        outcome_path = Path(exec_env[P.ENV_OUTCOME])
        outcome = read_json(outcome_path)
        if wait_publish and answer is not None:
            deadline = time.monotonic() + PUBLISH_TIMEOUT_S
            while time.monotonic() < deadline and sandbox.proc.poll() is None:
                outcome = read_json(outcome_path)
                if outcome.get("checkpoint", {}).get("status") in FINAL_CHECKPOINT:
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
        if sidecar is not None and sidecar.stop() not in (0, None):
            ctx.say(
                "    thaw sidecar's output:\n"
                + "\n".join("      " + ln for ln in sidecar.tail().splitlines())
            )
        netns.delete()


def _names(env: Mapping[str, str]) -> str:
    """How a container's environment is shown: how many THAW_* variables (the webhook step listed
    the ones that matter; `kubectl get pod -o yaml` shows them all in a cluster)."""
    return f"{len(env)} THAW_* variables"


def _shown_cmd(cmd: Sequence[str]) -> list[str]:
    """The workload's command with the repository's paths relative to it."""
    return [str(Path(a).relative_to(REPO)) if a.startswith(str(REPO) + "/") else a for a in cmd]


def _prepare_node(ctx: DemoContext) -> dict[str, Any]:
    """Signing keys, trust, store and cache directories, facts: what the node and cluster provide."""
    node_dir = ctx.workdir / "node"
    for sub in ("store", "cache", "runtime"):  # the store volume, the cache's and runtime's hostPaths
        (node_dir / sub).mkdir(parents=True)
    make_bundle(node_dir / "bundle")
    res = _cli(["keys", "generate", "--out", str(node_dir / "keys")], {})
    if res.returncode != 0:
        raise RuntimeError(f"thaw keys generate: {res.stderr.strip()}")
    (node_dir / "trust").mkdir()
    shutil.copy(node_dir / "keys" / "signing.pub", node_dir / "trust" / "signing.pub")
    facts = node_facts_file(node_dir / "facts.json")
    ctx.say(f"  $ thaw keys generate --out {node_dir / 'keys'}   # key id {res.stdout.strip()}")
    ctx.say(f"  node facts (--facts, $DEMO/node/facts.json): {describe_facts(facts)}")
    return facts


def describe_facts(facts: Mapping[str, Any]) -> str:
    """The node facts in one short line (pure): the CPU flags counted, not listed."""
    gpu = facts.get("gpu") or {}
    flags = (facts.get("cpu") or {}).get("flags") or []
    return (
        f"{facts.get('arch')}, kernel {facts.get('kernel')}, CRIU {facts.get('criu')}, "
        f"{gpu.get('count')} x {gpu.get('product')} (simulated), driver {facts.get('driver')}, "
        f"{len(flags)} CPU instruction-set flags"
    )


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
            f"    {NODE_CACHE}: {s['name']} {s['id'][:19]}… {s['bytes'] / 1e6:.0f} MB, tier {s['tier']}, "
            f"compat {s['compat']}"
        )
    if not inv.get("snapshots"):
        ctx.say(f"    {NODE_CACHE}: no snapshots; free {inv.get('free_bytes', 0) / 1e9:.0f} GB")
    # what it would post on this node's pods (kubectl describe pod), from thaw exec's outcome copies
    for line in res.stderr.splitlines():
        m = DRY_RUN_EVENT.search(line)
        if m:
            ctx.say(f"    event: {m.group(1)}")
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
    target = pod_containers(pod).target
    ctx.say(f"  pod qwen-0 on {LOCAL_NODE}: its containers run as the webhook injected them")
    ctx.say(f"    capabilities added: {', '.join(target['securityContext']['capabilities']['add'])}")
    ctx.say(f"    the workload: {' '.join(_shown_cmd(workload_cmd()))} (a CPU stand-in for vLLM)")
    run = run_pod(ctx, pod, "qwen-0", wait_publish=True)
    ctx.cold = run
    ck = run.outcome.get("checkpoint", {})
    ctx.say(f"    plan: {run.plan.get('action')} ({run.plan.get('reason', '')})")
    ready = f"{run.ready_s:.2f} s" if run.ready_s is not None else "never"
    ctx.say(f"    thaw exec: cold start; first answer after {ready} (thaw-tools and thaw-fetch included)")
    dump = f"criu dump {ck.get('criu_dump_s', '-')} s"
    if "sleep_s" in ck:
        dump = f"taken asleep (sleep {ck['sleep_s']} s, {dump}, wake {ck.get('wake_s', '-')} s)"
    size = f"{ck.get('bytes', 0) / 1e6:.0f} MB"
    ctx.say(
        f"    checkpoint: {ck.get('status')} {ck.get('snapshot', '')[:19]} {size}, {dump}, "
        f"published by thaw-sidecar in {ck.get('publish_s', '-')} s {ck.get('reason', '')}".rstrip()
    )
    ok = run.answer is not None and ck.get("status") == "published"
    ctx.record("node", "qwen-0: fetch", run.plan.get("action", "?"), run.plan.get("reason", ""))
    ctx.record("node", "qwen-0: exec (cold)", f"ready {ready}", f"checkpoint {ck.get('status')}", ok=ok)
    ctx.node_annotations = agent_once(ctx)


TIMING_WORDS = (
    ("verify_s", "verify"),
    ("criu_restore_s", "criu restore"),
    ("cuda_restore_s", "cuda restore"),
    ("wake_s", "wake"),
    ("ready_s", "ready check"),
    ("total_s", "total"),
)


def describe_timings(timings: Mapping[str, Any]) -> str:
    """A restore's timings in words, in the order they happen (pure)."""
    parts = [f"{word} {timings[key]} s" for key, word in TIMING_WORDS if key in timings]
    return ", ".join(parts) or "no timings"


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
    ctx.say(f"  pod {name}, placed on {LOCAL_NODE} ({here[0].tier}): a fresh container, as the first")
    run = run_pod(ctx, next(iter(ctx.pods.values())), f"restore-{name}", wait_publish=False)
    ctx.restored = run
    ready = f"{run.ready_s:.2f} s" if run.ready_s is not None else "never"
    ctx.say(f"    plan: {run.plan.get('action')} {run.plan.get('snapshot', run.plan.get('reason', ''))}")
    ctx.say(
        f"    thaw exec: {run.outcome.get('result')} {run.outcome.get('reason') or ''}".rstrip()
        + f" ({describe_timings(run.outcome.get('timings') or {})})"
    )
    ctx.say(f"    first answer after {ready} (thaw-tools and thaw-fetch included)")
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
