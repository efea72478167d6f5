"""The whole path in real pods: checkpoint in one pod, restore in a new pod with a new writable layer.

On a real kube-apiserver, kube-scheduler and kubelet 1.36 (containerd, runc, a CNI bridge), with
Thaw's image built from the repository's Dockerfile and imported into the node (tests/e2e/cluster.py
says how each piece is wired; the agent is a pod there). The workload is issue 10's server
(tests/workloads/stateful_server.py): a shared object it puts under ``$TMPDIR`` and maps, a journal
it keeps open and appends to under ``$HOME/.cache``, a UNIX socket under ``$TMPDIR``: all in the
container's writable layer. Pod A, annotated ``thaw.dev/snapshot``:

1. is admitted by the webhook through the MutatingWebhookConfiguration (``/mutate-restore``: the
   namespace is labelled ``thaw.dev/restore=allowed``): the layout of tests/e2e/pod_layout.py;
2. is placed by the second scheduler, which calls the extender for it (every pod it schedules);
3. runs ``thaw-tools`` (``thaw install-runtime``), ``thaw-fetch`` (a cold plan: no snapshot yet),
   the native sidecar ``thaw-sidecar`` and the wrapped workload, which checkpoints when ready; the
   sidecar publishes (the agent posts ``ThawCheckpointPublished``).

Pod B, the same template, a new pod with a new writable layer, is restored from A's snapshot: it
answers with the state A had at the checkpoint (its token, counter, journal and shared object), not
A's later state, its journal grows on, and the agent posts ``ThawRestored`` and lists the snapshot in
the Node's ``thaw.dev/cache``. Each pod's time to Ready is reported.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, cast

import pytest

from tests.e2e import pod_layout
from tests.e2e.cluster import NODE_NAME, SUMMARY, Thaw, dump_json, sh, wait_for
from tests.e2e.workloads import WORKLOADS, Workload
from tests.images import REPO
from webhook.config import DEFAULT_CAPABILITIES
from webhook.patches import SIDECAR_CONTAINER

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# The kernel's capability numbers (linux/capability.h) of what the webhook adds by default.
CAP_BITS = {"SYS_PTRACE": 19, "CHECKPOINT_RESTORE": 40}


class Api:
    """The few API calls the test makes, through the official client, as plain dicts."""

    def __init__(self, thaw: Thaw) -> None:
        from kubernetes import client

        self.client = thaw.cluster.api_client()
        self.core = client.CoreV1Api(self.client)

    def plain(self, obj: Any) -> dict[str, Any]:
        out = self.client.sanitize_for_serialization(obj)
        assert isinstance(out, dict)
        return out

    def pod(self, ns: str, name: str) -> dict[str, Any]:
        return self.plain(self.core.read_namespaced_pod(name, ns))

    def logs(self, ns: str, name: str, container: str) -> str:
        try:
            return str(self.core.read_namespaced_pod_log(name, ns, container=container))
        except Exception as exc:  # a container that has not started has no log yet
            return f"(no log: {exc})"

    def events(self, ns: str, name: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
        return [self.plain(e) for e in items]

    def node_annotations(self) -> dict[str, str]:
        annotations = self.plain(self.core.read_node(NODE_NAME))["metadata"].get("annotations") or {}
        return dict(annotations)


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions") or ()
    )


def _timeline(pod: Mapping[str, Any]) -> dict[str, float]:
    """kubelet's and the scheduler's timestamps (1 s resolution), in seconds after creation."""

    def at(stamp: Any) -> float:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()

    created = at(pod["metadata"]["creationTimestamp"])
    out: dict[str, float] = {}
    status = pod.get("status") or {}
    conditions = {c["type"]: c for c in status.get("conditions") or ()}
    out["scheduled"] = at(conditions["PodScheduled"]["lastTransitionTime"]) - created
    for c in status.get("initContainerStatuses") or ():
        done = (c.get("state") or {}).get("terminated") or {}
        running = (c.get("state") or {}).get("running") or {}  # thaw-sidecar, a native sidecar
        if done:
            out[f"{c['name']} started"] = at(done["startedAt"]) - created
            out[f"{c['name']} finished"] = at(done["finishedAt"]) - created
        elif running:
            out[f"{c['name']} started"] = at(running["startedAt"]) - created
    for c in status.get("containerStatuses") or ():
        running = (c.get("state") or {}).get("running") or {}
        if running:
            out[f"{c['name']} started"] = at(running["startedAt"]) - created
    out["ready"] = at(conditions["Ready"]["lastTransitionTime"]) - created
    return out


def _http(url: str, method: str = "GET") -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=5) as r:
        out = json.loads(r.read())
    assert isinstance(out, dict)
    return out


def _pod_manifest(name: str, image: str, w: Workload, snapshot: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"thaw.dev/snapshot": snapshot}},
        "spec": {
            "restartPolicy": "Never",  # a failure shows as it is, not as a restart loop
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "server",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": w.command,
                    "ports": [{"containerPort": w.port}],
                    "readinessProbe": {"httpGet": {"path": w.ready_path, "port": w.port}, "periodSeconds": 1},
                }
            ],
        },
    }


class Diagnose:
    """Everything that says why a pod is where it is, for a failure message."""

    def __init__(self, api: Api, thaw: Thaw, ns: str) -> None:
        self.api, self.thaw, self.ns = api, thaw, ns

    def __call__(self, name: str) -> str:
        pod = self.api.pod(self.ns, name)
        logs = "\n".join(
            f"--- {c}:\n{self.api.logs(self.ns, name, c)[-3000:]}"
            for c in [c["name"] for c in pod["spec"].get("initContainers") or ()] + ["server"]
        )
        events = "\n".join(f"{e.get('reason')}: {e.get('message')}" for e in self.api.events(self.ns, name))
        hosts = "\n".join(f"--- {p.name} log:\n{p.tail(2000)}" for p in self.thaw.processes)
        agent = f"--- agent pod log:\n{self.thaw.agent_log()[-3000:]}"
        return (
            f"pod {name} status:\n{dump_json(pod.get('status'))}\nevents:\n{events}\n{logs}\n{hosts}\n{agent}"
        )


def _start_pod(
    api: Api, ns: str, manifest: dict[str, Any], diagnose: Callable[[str], str], timeout: float = 180
) -> tuple[dict[str, Any], float]:
    """Create the pod and wait for Ready; the pod and the seconds from the create call to Ready."""
    name = manifest["metadata"]["name"]
    t0 = time.monotonic()
    api.core.create_namespaced_pod(ns, cast(Any, manifest))  # the client takes plain dicts

    def ready() -> dict[str, Any] | None:
        pod = api.pod(ns, name)
        if pod.get("status", {}).get("phase") in ("Failed", "Succeeded"):
            pytest.fail(f"pod {name} ended:\n{diagnose(name)}", pytrace=False)
        return pod if _ready(pod) else None

    pod = wait_for(f"pod {name} Ready", ready, timeout, every=0.1, explain=lambda: diagnose(name))
    return pod, time.monotonic() - t0


def _event(
    api: Api, ns: str, name: str, reason: str, *, diagnose: Callable[[str], str], timeout: float
) -> str:
    """The message of the agent's Event ``reason`` on pod ``name``. The agent's policy
    (thaw-agent-events) admits it only from the node the agent's token is bound to, reported as
    that node: the agent pod ran with its own identity, not an admin's."""

    def find() -> dict[str, Any] | None:
        return next((e for e in api.events(ns, name) if e.get("reason") == reason), None)

    event = wait_for(
        f"Event {reason} on pod {name}", find, timeout, every=0.5, explain=lambda: diagnose(name)
    )
    assert (event.get("reportingComponent"), event.get("reportingInstance")) == ("thaw-agent", NODE_NAME), (
        event
    )
    return str(event.get("message"))


@pytest.mark.parametrize("workload", list(WORKLOADS.values()), ids=list(WORKLOADS))
def test_checkpoint_in_one_pod_restore_in_another(
    thaw: Thaw, workload_image: Callable[[Workload], str], workload: Workload
) -> None:
    from kubernetes import client

    image = workload_image(workload)
    api = Api(thaw)
    ns, snapshot = f"e2e-{workload.name}", f"e2e-{workload.name}"
    api.core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels={"thaw.dev/restore": "allowed"}))
    )
    # What the webhook mounts by default (webhook/config.py): Secret thaw-signing-key (signing.key)
    # for pods that checkpoint, Secret thaw-trust with the public keys for thaw-fetch.
    for secret, file in (("thaw-signing-key", "signing.key"), ("thaw-trust", "signing.pub")):
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=secret), string_data={file: (thaw.keys / file).read_text()}
        )
        api.core.create_namespaced_secret(ns, body)
    diagnose = Diagnose(api, thaw, ns)
    report: dict[str, Any] = {"workload": workload.name}

    # Pod A: admitted, scheduled through the extender, cold start, checkpoint on ready, published.
    filters = thaw.extender_requests("filter")
    pod_a, report["a_ready_s"] = _start_pod(api, ns, _pod_manifest("a", image, workload, snapshot), diagnose)
    # kube-scheduler called the extender for it: one filter call (with one feasible node it skips
    # prioritizing). Nothing else is being scheduled in this cluster.
    assert thaw.extender_requests("filter") == filters + 1, diagnose("a")
    pod_layout.check_injected(
        pod_a,
        image=thaw.thaw_image,
        command=workload.command,
        capabilities=DEFAULT_CAPABILITIES,
        scheduler_name=thaw.scheduler_name(),
        ready_url=f"http://127.0.0.1:{workload.port}{workload.ready_path}",
        snapshot=snapshot,
    )
    pod_layout.check_init_ran(pod_a)
    report["a_timeline_s"] = _timeline(pod_a)
    assert pod_a["spec"]["nodeName"] == NODE_NAME
    fetch_a = api.logs(ns, "a", "thaw-fetch")
    assert "cold start: no snapshot" in fetch_a, fetch_a
    report["a_published"] = _event(api, ns, "a", "ThawCheckpointPublished", diagnose=diagnose, timeout=180)
    reasons = {str(e.get("reason")) for e in api.events(ns, "a")}
    assert "ThawColdStart" in reasons, reasons
    # thaw exec dumped; thaw-sidecar (the only container with the store and the key) published.
    assert "checkpoint: {'status': 'published'" in api.logs(ns, "a", "server"), diagnose("a")
    assert "published snapshot sha256:" in api.logs(ns, "a", SIDECAR_CONTAINER), diagnose("a")
    a_url = f"http://{pod_a['status']['podIP']}:{workload.port}"
    state_a = _http(a_url + workload.state_path)
    # Its state lives in the writable layer a new pod lacks: the shared object under $TMPDIR (the
    # prebuilt copy: the image has no compiler), the journal under $HOME/.cache.
    assert str(state_a["lib"]).startswith("/tmp/") and state_a["compiled"] is False, state_a
    assert str(state_a["journal"]).startswith("/root/.cache/") and state_a["journal_lines_at_start"] == 0
    assert state_a["ipc_answer"] == state_a["token"], state_a
    if workload.bump_path:  # A moves on; B must come back with the state of the checkpoint
        assert _http(a_url + workload.bump_path, "POST") != state_a

    # The node advertises the snapshot (the agent's thaw.dev/cache), so the extender can rank it.
    def cached() -> dict[str, Any] | None:
        raw = api.node_annotations().get("thaw.dev/cache")
        inventory = json.loads(raw) if raw else {}
        listed = any(e.get("name") == snapshot for e in inventory.get("snapshots") or ())
        return inventory if listed else None

    report["node_cache"] = wait_for(f"thaw.dev/cache on node {NODE_NAME} listing {snapshot}", cached, 30)

    # Pod B: a new pod (new writable layer, network, PID namespace), restored with A's state.
    filters = thaw.extender_requests("filter")
    pod_b, report["b_ready_s"] = _start_pod(api, ns, _pod_manifest("b", image, workload, snapshot), diagnose)
    assert thaw.extender_requests("filter") == filters + 1, diagnose("b")
    pod_layout.check_init_ran(pod_b)
    report["b_timeline_s"] = _timeline(pod_b)
    fetch_b = api.logs(ns, "b", "thaw-fetch")
    assert "restore sha256:" in fetch_b, f"{fetch_b}\n{diagnose('b')}"
    report["b_restored"] = _event(api, ns, "b", "ThawRestored", diagnose=diagnose, timeout=60)
    b_url = f"http://{pod_b['status']['podIP']}:{workload.port}"
    state_b = _http(b_url + workload.state_path)
    assert state_b == state_a, f"restored {state_b}, checkpointed {state_a}\n{diagnose('b')}"
    assert pod_b["status"]["podIP"] != pod_a["status"]["podIP"]
    # B lives on from the checkpoint: its counter (in the shared object) and journal grow from there.
    assert _http(b_url + "/bump", "POST") == {"counter": state_a["counter"] + 1}
    grown = _http(b_url + workload.state_path)
    assert grown["journal_lines"] == state_a["journal_lines"] + 1, grown
    assert "restored" in api.logs(ns, "b", "server"), diagnose("b")

    # The workload process ran with the capabilities the webhook added (PID 1 is thaw exec).
    status = _exec(thaw, ns, "b", ["cat", "/proc/1/status"])
    cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    for cap in DEFAULT_CAPABILITIES:
        assert cap_eff >> CAP_BITS[cap] & 1, f"{cap} not effective in pod b: CapEff {cap_eff:x}"

    text = json.dumps(report, indent=1, default=str)
    (thaw.run / f"report-{workload.name}.json").write_text(text + "\n")
    print(f"\ne2e report ({thaw.run}): {text}")
    SUMMARY.append(
        f"{workload.name}: pod A Ready {report['a_ready_s']:.1f} s after create (cold start, checkpoint "
        f"after), pod B Ready {report['b_ready_s']:.1f} s after create ({report['b_restored']})"
    )


def _exec(thaw: Thaw, ns: str, pod: str, cmd: list[str]) -> str:
    """``kubectl exec`` through kube-apiserver to the kubelet (the client-go path users take)."""
    kubectl = REPO / ".venv" / "bin" / "kubectl"
    return sh(
        [kubectl, "--kubeconfig", thaw.cluster.kubeconfig, "-n", ns, "exec", pod, "-c", "server", "--", *cmd]
    )
