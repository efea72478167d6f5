"""``thaw demo`` (``make demo``): the whole path on this machine, one step after another.

Each step is a function ``step(ctx) -> None`` in ``STEPS``. A step prints what it does as it goes
(``ctx.say``), records one line per case for the closing summary (``ctx.record``), and leaves what
later steps need in ``ctx`` (the webhook step leaves the mutated pods in ``ctx.pods``). Steps start
their own processes and stop them before returning (context managers), so an interrupted demo
leaves nothing running. To add a step: write ``def my_step(ctx: DemoContext) -> None`` and append
``("name", my_step)`` to ``STEPS``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import http.client
import json
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonpatch  # type: ignore[import-untyped,unused-ignore]

if TYPE_CHECKING:
    from extender.demo import Placement
    from thaw.dev.demo_node import PodRun

SNAPSHOT = "qwen3-8b-vllm"
RESTORE_NS = "llm-serving"  # labelled thaw.dev/restore=allowed: kube-apiserver calls /mutate-restore
PLAIN_NS = "team-sandbox"  # not labelled: kube-apiserver calls /mutate
REPLICAS = 5  # replicas the extender step places after the first pod took the snapshot
WIDTH = 100  # the demo's lines: longer ones are wrapped, their continuation indented
WORKDIR = "$DEMO"  # how the demo's work directory is shown (its path is printed once, at the start)
_DIGEST = re.compile(r"\b((?:sha256:)?[0-9a-f]{12})[0-9a-f]{52}\b")


def wrap_line(line: str, width: int = WIDTH) -> str:
    """``line`` within ``width`` columns, its continuation indented 4 more than it (pure). Words are
    never split, so a path longer than the line stays whole."""
    if len(line) <= width:
        return line
    body = line.lstrip(" ")
    indent = " " * (len(line) - len(body))
    return textwrap.fill(
        body,
        width=width,
        initial_indent=indent,
        subsequent_indent=indent + "    ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def short_ids(text: str) -> str:
    """Snapshot ids (and their directories' 64 hex digits) as their first 12 (``sha256:a8aabd8769f3…``),
    for people (pure)."""
    return _DIGEST.sub(r"\1…", text)


@dataclass
class Row:
    step: str
    case: str
    outcome: str
    detail: str


@dataclass
class DemoContext:
    workdir: Path
    out: Callable[[str], None] = print
    rows: list[Row] = field(default_factory=list)
    # Mutated pods by name, as kube-apiserver would store them after the webhook (for later steps).
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: int = 0
    # Left by the node step (thaw/dev/demo_node.py): this machine's facts, the annotations `thaw agent
    # --once` printed, and the cold pod's run; by the extender step: placements; by the restore step.
    facts: dict[str, Any] | None = None
    node_annotations: dict[str, str] = field(default_factory=dict)
    cold: PodRun | None = None
    placements: list[Placement] = field(default_factory=list)
    restored: PodRun | None = None

    def say(self, text: str = "") -> None:
        """Print ``text``: the work directory shown as $DEMO, ids short, lines wrapped at WIDTH."""
        text = short_ids(self.shown(text))
        self.out("\n".join(wrap_line(line) for line in text.split("\n")))

    def shown(self, text: str | Path) -> str:
        """``text`` with the demo's work directory written as $DEMO."""
        return str(text).replace(str(self.workdir), WORKDIR)

    def record(self, step: str, case: str, outcome: str, detail: str = "", ok: bool = True) -> None:
        self.rows.append(Row(step, case, outcome, detail))
        if not ok:
            self.failures += 1


# --- step: the webhook ----------------------------------------------------------------------------

DEMO_CONFIG = """\
# thaw webhook --config: the manifests' settings (webhook/config.py documents every key)
image: ghcr.io/kube-thaw/thaw:0.1.0
excludedNamespaces: [kube-system, thaw-system]
cache:
  hostPath: /var/lib/thaw/cache
scheduler:
  extendedResource: true
"""


def vllm_pod(name: str, namespace: str, annotations: dict[str, str] | None) -> dict[str, Any]:
    """A vLLM server pod as kube-apiserver hands it to webhooks (defaults filled in)."""
    meta: dict[str, Any] = {"generateName": f"{name}-", "labels": {"app": name}, "creationTimestamp": None}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": meta,
        "spec": {
            "initContainers": [
                {
                    "name": "model-download",
                    "image": "ghcr.io/example/hf-download:1.2",
                    "command": ["hf-download", "Qwen/Qwen3-8B", "/models"],
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai:v0.9.2",
                    "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                    "args": ["--model", "/models/Qwen3-8B", "--port", "8000"],
                    "ports": [{"name": "http", "containerPort": 8000, "protocol": "TCP"}],
                    "env": [{"name": "VLLM_USE_V1", "value": "1"}, {"name": "HOME", "value": "/tmp"}],
                    "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
                    "volumeMounts": [{"name": "models", "mountPath": "/models"}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": "http", "scheme": "HTTP"},
                        "periodSeconds": 5,
                        "timeoutSeconds": 1,
                        "successThreshold": 1,
                        "failureThreshold": 3,
                    },
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "volumes": [{"name": "models", "emptyDir": {}}],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
        },
        "status": {},
    }


def admission_review(pod: dict[str, Any], namespace: str, uid: str) -> dict[str, Any]:
    """The AdmissionReview kube-apiserver sends for a Pod CREATE (the namespace is in the request:
    pods created by controllers have none in their metadata)."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


@dataclass
class _Case:
    name: str
    path: str
    body: bytes
    pod: dict[str, Any] | None
    expect: str  # mutated, unchanged, refused, HTTP 400


def _cases() -> list[_Case]:
    # vLLM's sleep mode (docs/sleep-mode.md): the stand-in serves the same endpoints
    snap = {"thaw.dev/snapshot": SNAPSHOT, "thaw.dev/sleep": "/sleep?level=1", "thaw.dev/wake": "/wake_up"}
    cases: list[_Case] = []

    def case(name: str, path: str, pod: dict[str, Any], ns: str, expect: str) -> None:
        body = json.dumps(admission_review(pod, ns, f"demo-{len(cases) + 1:04d}")).encode()
        cases.append(_Case(name, path, body, pod, expect))

    case(
        f"qwen in {RESTORE_NS} (restore allowed)",
        "/mutate-restore",
        vllm_pod("qwen", RESTORE_NS, snap),
        RESTORE_NS,
        "mutated",
    )
    case(
        f"qwen in {PLAIN_NS} (not labelled)",
        "/mutate",
        vllm_pod("qwen", PLAIN_NS, snap),
        PLAIN_NS,
        "unchanged",
    )
    case(
        "plain pod, no thaw.dev/snapshot",
        "/mutate-restore",
        vllm_pod("plain", RESTORE_NS, None),
        RESTORE_NS,
        "unchanged",
    )
    case(
        "invalid thaw.dev/checkpoint",
        "/mutate-restore",
        vllm_pod("bad", RESTORE_NS, {**snap, "thaw.dev/checkpoint": "always"}),
        RESTORE_NS,
        "refused",
    )
    no_command = vllm_pod("nocmd", RESTORE_NS, snap)
    del no_command["spec"]["containers"][0]["command"]
    case("container without command", "/mutate-restore", no_command, RESTORE_NS, "refused")
    case(
        "pod in kube-system",
        "/mutate-restore",
        vllm_pod("sys", "kube-system", snap),
        "kube-system",
        "unchanged",
    )
    cases.append(_Case("malformed body", "/mutate-restore", b'{"kind": "AdmissionReview"', None, "HTTP 400"))
    return cases


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100, initial_indent="      ", subsequent_indent="         ")


def _post(conn: http.client.HTTPSConnection, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data: dict[str, Any] = json.loads(resp.read())
    return resp.status, data


def _describe_mutation(ctx: DemoContext, after: dict[str, Any], n_ops: int) -> str:
    spec = after["spec"]
    target = next(c for c in spec["containers"] if c["name"] == "vllm")
    env = {e["name"]: e.get("value", "(downward API)") for e in target.get("env", [])}
    ann = after["metadata"]["annotations"]
    wrap = textwrap.TextWrapper(width=100, initial_indent="      ", subsequent_indent="        ")
    lines = [
        f"init containers: {', '.join(c['name'] for c in spec['initContainers'])}",
        f"command: {' '.join(target['command'])}",
        "env: "
        + ", ".join(
            f"{k}={env[k]}"
            for k in ("THAW_NAME", "THAW_WORKLOAD", "THAW_READY", "THAW_CHECKPOINT", "THAW_NODE_NAME")
        ),
        f"capabilities added: {', '.join(target['securityContext']['capabilities']['add'])}",
        f"volumes added: {', '.join(v['name'] for v in spec['volumes'] if v['name'].startswith('thaw-'))}",
        f"resources: requests {target['resources']['requests']}",
        "annotations: "
        f"thaw.dev/injected={ann['thaw.dev/injected']}, thaw.dev/workload={ann['thaw.dev/workload']}",
    ]
    for line in lines:
        ctx.say(wrap.fill(line))
    return f"{n_ops} patch ops; workload {ann['thaw.dev/workload']}"


def webhook_step(ctx: DemoContext) -> None:
    """Start ``thaw webhook`` with TLS from ``thaw certs`` and send it real-shaped reviews."""
    from webhook.launch import make_certs, running_webhook

    certs = make_certs(ctx.workdir / "certs")
    config = ctx.workdir / "webhook.yaml"
    config.write_text(DEMO_CONFIG)
    ctx.say(f"$ thaw certs --out {certs} --dns localhost --ip 127.0.0.1")
    ctx.say(f"$ thaw webhook --cert-dir {certs} --config {config} --port PORT")
    with running_webhook(certs, config=config, log_file=ctx.workdir / "webhook.log") as run:
        host, port = run.url.removeprefix("https://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=run.ssl_context(), timeout=10)
        ctx.say(f"  serving on {run.url} (gunicorn, 2 workers); TLS verified against {certs / 'ca.crt'}\n")
        for i, case in enumerate(_cases(), 1):
            status, answer = _post(conn, case.path, case.body)
            reinvoked: bool | None = None
            ctx.say(f"  [{i}] POST {case.path}: {case.name}")
            if status != 200:
                outcome = f"HTTP {status}"
                detail = answer.get("error", "")
                ctx.say(_wrap(f"-> {outcome}: {detail}"))
            else:
                response = answer["response"]
                if not response["allowed"]:
                    outcome, detail = "refused", response["status"]["message"]
                    ctx.say(_wrap(f"-> REFUSED ({response['status']['code']}): {detail}"))
                elif "patch" in response:
                    outcome = "mutated"
                    ops = json.loads(base64.b64decode(response["patch"]))
                    assert case.pod is not None
                    after = jsonpatch.apply_patch(copy.deepcopy(case.pod), ops)
                    ctx.say(f"      -> MUTATED ({len(ops)} JSON Patch operations):")
                    detail = _describe_mutation(ctx, after, len(ops))
                    ctx.pods[after["metadata"]["generateName"] + "demo"] = after
                    # kube-apiserver reinvokes webhooks (reinvocationPolicy: IfNeeded): nothing more
                    again = json.loads(case.body)
                    again["request"]["object"] = after
                    _, second = _post(conn, case.path, json.dumps(again).encode())
                    reinvoked = "patch" in second["response"]
                    ctx.say(
                        "      reinvoked with the mutated pod -> "
                        + ("PATCHED AGAIN" if reinvoked else "no patch")
                    )
                else:
                    outcome = "unchanged"
                    warnings = response.get("warnings", [])
                    detail = warnings[0] if warnings else "no patch, no warning"
                    ctx.say(_wrap(f"-> UNCHANGED: {detail}"))
            ctx.record("webhook", case.name, outcome, detail, ok=outcome == case.expect)
            if reinvoked is not None:
                ctx.record(
                    "webhook", "  ... reinvoked", "patched" if reinvoked else "no patch", ok=not reinvoked
                )
        conn.close()
    ctx.say("  webhook stopped\n")


# --- the sequence ---------------------------------------------------------------------------------

Step = Callable[[DemoContext], None]


def demo_cluster(ctx: DemoContext, workload: str) -> dict[str, Any]:
    """The simulated GPU cluster: this machine as ``gpu-local`` with the annotations ``thaw agent
    --once`` printed, and six simulated nodes. Nodes of this machine's facts hold the snapshot it
    took (same id and size) in memory, on disk, or not at all; one has other facts (an H200); one
    has only GPU Feature Discovery labels."""
    from extender.synthetic import H200_FACTS, cached, node
    from thaw.contract.inventory import parse_inventory
    from thaw.dev.demo_node import LOCAL_NODE

    facts: Any = ctx.facts
    held = []
    if ctx.node_annotations:
        held = [
            s
            for s in parse_inventory(ctx.node_annotations["thaw.dev/cache"])["snapshots"]
            if s["name"] == SNAPSHOT
        ]

    def snap(tier: str) -> Any:
        if held:
            return {**held[0], "tier": tier}
        return cached(SNAPSHOT, 8_100_000_000, tier, facts=facts, workload=workload)  # type: ignore[arg-type]

    h200 = {**H200_FACTS, **{k: facts[k] for k in ("arch", "kernel", "criu")}}
    items = [
        node(LOCAL_NODE, facts=None, snapshots=None, extra_annotations=ctx.node_annotations),
        node("gpu-a", facts=facts, snapshots=[snap("memory")]),
        node("gpu-b", facts=facts, snapshots=[snap("disk")]),
        node("gpu-c", facts=facts, snapshots=[snap("memory")], restoring=3),
        node("gpu-d", facts=facts, snapshots=[]),
        node("gpu-e", facts=h200, snapshots=[]),  # type: ignore[arg-type]
        node("gpu-f", facts=facts, gfd=True),
    ]
    return {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": items}


def extender_step(ctx: DemoContext) -> None:
    """Place the webhook's pods (and a few replicas of them) with the real ``thaw extender``."""
    from extender.demo import example_pods, place_pods

    # Replicas of the webhook's pod, as its Deployment scaling out creates them (qwen-0 is the one
    # that cold-started and took the snapshot); every other one asks for placement: required.
    pods = []
    for mutated in ctx.pods.values():
        for i in range(1, REPLICAS + 1):
            pod = copy.deepcopy(mutated)
            pod["metadata"]["name"] = f"qwen-{i}"
            if i % 2 == 0:
                pod["metadata"]["annotations"]["thaw.dev/placement"] = "required"
            pods.append(pod)
        break
    if not pods:
        pods = example_pods(REPLICAS)
    workload = pods[0]["metadata"]["annotations"]["thaw.dev/workload"]
    cluster = demo_cluster(ctx, workload) if ctx.facts is not None else None
    scoring = None
    if ctx.cold is not None and ctx.cold.ready_s is not None:
        # Constants for the stand-in, not for a GPU model (extender/scoring.py's defaults): its
        # cold start as just measured, a restore's fixed cost on this machine, and a store behind
        # a 1 Gb/s link (a snapshot this small would otherwise be as quick to fetch as to hold).
        scoring = {"cold_fixed_s": round(ctx.cold.ready_s, 2), "restore_fixed_s": 0.3, "fetch_bps": 1.0e8}
        ctx.say(
            f"  thaw extender --scoring: constants for the stand-in (cold start {scoring['cold_fixed_s']} s, "
            f"a restore's fixed {scoring['restore_fixed_s']} s, store {scoring['fetch_bps'] / 1e6:.0f} MB/s)"
        )
    ctx.say("  the extender counts each replica it places as a restore in progress on that node, so")
    ctx.say("  replicas spread at once (the agents' thaw.dev/cache restoring reports lag up to 30 s)\n")
    ctx.placements = place_pods(pods, out=ctx.say, cluster=cluster, scoring=scoring)
    for p in ctx.placements:
        ctx.record(
            "extender",
            p.pod,
            f"{p.node} ({p.tier})",
            f"ready ~{p.seconds:.1f} s vs cold start ~{p.cold_seconds:.1f} s, score {p.score}/10",
            ok=p.tier != "cold",
        )
    ctx.say("  extender stopped\n")


def _node_step(ctx: DemoContext) -> None:
    from thaw.dev.demo_node import cold_step

    cold_step(ctx)


def _restore_step(ctx: DemoContext) -> None:
    from thaw.dev.demo_node import restore_step

    restore_step(ctx)


STEPS: list[tuple[str, Step]] = [
    ("webhook", webhook_step),
    ("node: cold start and checkpoint", _node_step),
    ("extender", extender_step),
    ("node: restore", _restore_step),
]


TIER_WHY = {
    "memory": "snapshot in node memory",
    "disk": "snapshot on node disk",
    "fetch": "would fetch, then restore",
    "cold": "no snapshot it can restore: cold start",
}


def _ready(seconds: float | None) -> str:
    return f"{seconds:.2f} s" if seconds is not None else "never"


def _same_state(ctx: DemoContext) -> bool:
    """Whether the restored server answered with the cold server's warm-up digest."""
    if ctx.cold is None or ctx.restored is None or ctx.cold.answer is None or ctx.restored.answer is None:
        return False
    return bool(ctx.restored.answer.get("digest") == ctx.cold.answer.get("digest"))


def pod_rows(ctx: DemoContext) -> list[tuple[str, str, str, str, str]]:
    """One row per pod of the demo: (pod, node, what happened, time to ready, why). The pods this
    machine ran are measured (ready = the server's first answer, from thaw-tools' start); the others
    were only placed, with the extender's estimate. Pure."""
    from thaw.dev.demo_node import LOCAL_NODE

    rows: list[tuple[str, str, str, str, str]] = []
    skipped = {r.step: r.detail for r in ctx.rows if r.outcome == "skipped"}
    if ctx.cold is not None:
        status = ctx.cold.outcome.get("checkpoint", {}).get("status", "not taken")
        why = ctx.cold.plan.get("reason") or ""
        rows.append(
            (ctx.cold.name, LOCAL_NODE, f"cold start, checkpoint {status}", _ready(ctx.cold.ready_s), why)
        )
    elif "node" in skipped:
        rows.append(("qwen-0", LOCAL_NODE, "not run", "-", skipped["node"]))
    restored = ctx.restored.name.removeprefix("restore-") if ctx.restored is not None else None
    for p in ctx.placements:
        if p.pod == restored and ctx.restored is not None:
            run = ctx.restored
            result = run.outcome.get("result", "?")
            state = ", state kept" if _same_state(ctx) else ", state LOST" if result == "restored" else ""
            why = run.outcome.get("reason") or f"{TIER_WHY.get(p.tier, p.tier)}{state}"
            rows.append((p.pod, p.node, f"{result} ({p.tier})", _ready(run.ready_s), why))
            continue
        note = "" if p.node != LOCAL_NODE else "; the demo restores one pod"
        why = f"{TIER_WHY.get(p.tier, p.tier)} (score {p.score}/10){note}"
        rows.append((p.pod, p.node, "placed, not run", f"~{p.seconds:.1f} s est.", why))
    if ctx.restored is None and "restore" in skipped:
        rows.append(("-", LOCAL_NODE, "no restore", "-", skipped["restore"]))
    return rows


def summary_reason(detail: str) -> str:
    """An admission answer's reason as the summary shows it: its first clause (the step printed it
    whole). Pure."""
    return detail.removeprefix("thaw: ").split(": ", 1)[0]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int = WIDTH) -> list[str]:
    """``rows`` under ``headers`` in columns, indented 2; the last column wraps within ``width``
    (pure)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    lead = 2 + sum(w + 2 for w in widths)
    room = max(width - lead, 24)
    out = []
    for cells in [headers, *rows]:
        head = "  " + "".join(f"{c:<{w}}  " for c, w in zip(cells[:-1], widths, strict=True))
        last = textwrap.wrap(cells[-1], room, break_long_words=False, break_on_hyphens=False) or [""]
        out.append((head + last[0]).rstrip())
        out.extend(" " * lead + more for more in last[1:])
    return out


def _cells(ctx: DemoContext, row: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(short_ids(ctx.shown(cell)) for cell in row)


def print_summary(ctx: DemoContext) -> None:
    ctx.say("=" * WIDTH)
    ctx.say("Summary")
    hooks = [r for r in ctx.rows if r.step == "webhook"]
    if hooks:
        ctx.say("\nAdmission (thaw webhook): each case and its answer")
        for line in table(
            ("case", "answer", "why"),
            [_cells(ctx, (r.case.strip(), r.outcome, summary_reason(r.detail))) for r in hooks],
        ):
            ctx.out(line)
    pods = pod_rows(ctx)
    if pods:
        ctx.say(
            "\nPods: ready = the server's first answer, from the start of thaw-tools; pods placed but not"
            "\nrun (the simulated nodes, a second pod here) show the extender's estimate"
        )
        for line in table(("pod", "node", "what happened", "ready", "why"), [_cells(ctx, r) for r in pods]):
            ctx.out(line)
    if ctx.cold and ctx.restored and ctx.cold.ready_s and ctx.restored.ready_s:
        from thaw.dev.demo_node import MEM_MB, WARMUP_S

        ctx.say(
            f"\nTime to ready on this machine (CPU stand-in: {WARMUP_S} s of warm-up, {MEM_MB} MiB): cold "
            f"start {ctx.cold.ready_s:.2f} s, restore {ctx.restored.ready_s:.2f} s, "
            f"{ctx.cold.ready_s / ctx.restored.ready_s:.1f}x faster"
        )
    verdict = "every case behaved as expected" if ctx.failures == 0 else f"{ctx.failures} case(s) did not"
    ctx.say(f"\n{verdict}")


def run(args: argparse.Namespace | None = None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="thaw-demo-"))
    ctx = DemoContext(workdir=workdir)
    ctx.out(f"thaw demo: work directory {workdir}, shown as {WORKDIR}, removed at the end")
    try:
        for name, step in STEPS:
            ctx.say(f"== {name} " + "=" * (96 - len(name)))
            step(ctx)
        print_summary(ctx)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ctx.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(run())
