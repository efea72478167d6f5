"""The shipped ValidatingAdmissionPolicies against a real kube-apiserver 1.36 (tests/controlplane.py).

The default overlay is applied for real (server-side apply: kube-apiserver's own validation of every
object, CEL type-checked at creation). Then the identities the policies narrow act with real
credentials: tokens from TokenRequest, the agent's bound to a pod on node-a (kube-apiserver puts
``authentication.kubernetes.io/node-name: node-a`` in its extra info, exactly as for the token
kubelet mounts), the certificate controller's its ServiceAccount's. Each refusal is checked with
kube-apiserver's message, and each allowed write next to it, so a policy that refuses everything
fails too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.controlplane import ControlPlane
from tests.manifests.test_manifests import _render
from thaw.dev.sandbox import wait_for
from thaw.node.events import event_body, outcome_specs, pod_ref

NS = "thaw-system"
RESTORE_NS = "llm"
PLAIN_NS = "plain"


def _node(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true"}},
    }


def _pod(name: str, namespace: str, node: str, thaw: bool = True, sa: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if thaw:
        meta["annotations"] = {"thaw.dev/injected": "v1"}
    spec: dict[str, Any] = {"nodeName": node, "containers": [{"name": "main", "image": "registry.invalid/x"}]}
    if sa:
        spec["serviceAccountName"] = sa
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


@pytest.fixture(scope="module")
def cluster(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    cp = control_plane
    cp.apply(_render("default"))
    cp.apply(
        [
            _node("node-a"),
            _node("node-b"),
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": RESTORE_NS, "labels": {"thaw.dev/restore": "allowed"}},
            },
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLAIN_NS}},
        ]
    )
    cp.apply(
        [
            _pod("pod-a", RESTORE_NS, "node-a"),
            _pod("pod-b", RESTORE_NS, "node-b"),
            _pod("pod-c", RESTORE_NS, "node-a", thaw=False),
            _pod("pod-p", PLAIN_NS, "node-a"),
            _pod("agent-a", NS, "node-a", thaw=False, sa="thaw-agent"),
        ]
    )
    tmp = tmp_path_factory.mktemp("tokens")
    agent = cp.token_kubeconfig(tmp / "agent", cp.token(NS, "thaw-agent", bound_pod="agent-a"))
    unbound = cp.token_kubeconfig(tmp / "unbound", cp.token(NS, "thaw-agent"))
    certs = cp.token_kubeconfig(tmp / "certs", cp.token(NS, "thaw-certs"))
    pods = {
        p: json.loads(cp.kubectl("-n", ns, "get", "pod", p, "-o", "json").stdout)
        for p, ns in (
            ("pod-a", RESTORE_NS),
            ("pod-b", RESTORE_NS),
            ("pod-c", RESTORE_NS),
            ("pod-p", PLAIN_NS),
        )
    }

    # A policy is enforced once kube-apiserver's policy informer has it: wait for a known refusal.
    def refused() -> str:
        return cp.kubectl("--kubeconfig", str(agent), "label", "node", "node-a", "x=y", check=False).stderr

    wait_for(
        lambda: "forbidden" in refused(),
        30,
        "the node policy to be enforced",
        interval=0.2,
        explain=lambda: f"kubectl label node node-a as the agent: {refused()}",
    )
    yield {"agent": agent, "unbound": unbound, "certs": certs, "pods": pods, "tmp": tmp}


def _as(
    cp: ControlPlane, kubeconfig: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return cp.kubectl(*args, kubeconfig=kubeconfig, stdin=stdin, check=False)


def allowed(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr


def refused(out: subprocess.CompletedProcess[str], policy: str, says: str) -> None:
    assert out.returncode != 0, f"allowed, but {policy} should refuse it: {out.stdout}"
    assert f"ValidatingAdmissionPolicy '{policy}'" in out.stderr, out.stderr
    assert says in out.stderr, out.stderr


# ---- the agent's identity -----------------------------------------------------------------------


def test_the_agents_token_carries_its_pods_node(control_plane: ControlPlane, cluster: dict[str, Any]) -> None:
    review = json.loads(_as(control_plane, cluster["agent"], "auth", "whoami", "-o", "json").stdout)
    info = review["status"]["userInfo"]
    assert info["username"] == f"system:serviceaccount:{NS}:thaw-agent"
    assert info["extra"]["authentication.kubernetes.io/node-name"] == ["node-a"]


def test_agent_patches_only_its_own_nodes_thaw_annotations(
    control_plane: ControlPlane, cluster: dict[str, Any]
) -> None:
    cp, agent = control_plane, cluster["agent"]
    allowed(_as(cp, agent, "annotate", "node", "node-a", "thaw.dev/cache={}", "--overwrite"))
    policy = "thaw-agent-own-node"
    refused(
        _as(cp, agent, "annotate", "node", "node-b", "thaw.dev/cache={}", "--overwrite"),
        policy,
        "may change only its own Node, not node-b",
    )
    refused(_as(cp, agent, "annotate", "node", "node-a", "team=ml"), policy, "only thaw.dev/* annotations")
    refused(_as(cp, agent, "label", "node", "node-a", "nvidia.com/gpu.present-"), policy, "labels")
    taint = '{"spec":{"taints":[{"key":"k","effect":"NoSchedule"}]}}'
    refused(_as(cp, agent, "patch", "node", "node-a", "-p", taint), policy, "spec (taints included)")
    # A token not bound to a pod has no node: nothing is allowed.
    refused(
        _as(cp, cluster["unbound"], "annotate", "node", "node-a", "thaw.dev/cache=x", "--overwrite"),
        policy,
        "carry no authentication.kubernetes.io/node-name",
    )
    # Everyone else is untouched by the policy.
    allowed(cp.kubectl("annotate", "node", "node-b", "team=web", check=False))


def _event(cluster: dict[str, Any], pod: str, node: str, **change: Any) -> str:
    """The Event thaw agent on ``node`` posts for ``pod`` (thaw.node.events, as the agent builds it)."""
    obj = cluster["pods"][pod]
    ref = pod_ref(obj)
    if ref is None:  # not a Thaw pod: build the same reference by hand
        meta = obj["metadata"]
        ref = {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "containers": ["main"],
            "target": "main",
        }
    [spec] = outcome_specs(
        {"result": "restored", "plan": {"snapshot": "sha256:" + "a" * 64}, "timings": {"total_s": 1.5}}
    )
    body = event_body(spec, {"started": "2026-12-01T00:00:00Z"}, ref, node, "2026-12-01T00:00:00Z")
    body["metadata"]["name"] += f".{len(change)}{abs(hash(json.dumps(change, sort_keys=True))) % 10**6}"
    for path, value in change.items():
        target = body
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return json.dumps(body)


def test_agent_posts_events_only_on_thaw_pods_of_its_node(
    control_plane: ControlPlane, cluster: dict[str, Any]
) -> None:
    cp, agent = control_plane, cluster["agent"]
    policy = "thaw-agent-events"

    def post(text: str) -> subprocess.CompletedProcess[str]:
        return _as(cp, agent, "create", "-f", "-", stdin=text)

    allowed(post(_event(cluster, "pod-a", "node-a")))
    refused(post(_event(cluster, "pod-b", "node-a")), policy, f"pod {RESTORE_NS}/pod-b is on node-b")
    refused(post(_event(cluster, "pod-c", "node-a")), policy, "not a Thaw pod")
    refused(
        post(
            _event(
                cluster, "pod-a", "node-a", **{"involvedObject.uid": "0f0f0f0f-0000-4000-8000-000000000000"}
            )
        ),
        policy,
        "(another uid)",
    )
    refused(
        post(_event(cluster, "pod-a", "node-b")), policy, "must report its Events as thaw-agent on node-a"
    )
    refused(post(_event(cluster, "pod-a", "node-a", reason="Killing")), policy, "reason Killing")
    refused(post(_event(cluster, "pod-p", "node-a")), policy, f"not in {PLAIN_NS}")
    node_ref = {"apiVersion": "v1", "kind": "Node", "name": "node-b", "namespace": RESTORE_NS, "uid": "x"}
    refused(post(_event(cluster, "pod-a", "node-a", involvedObject=node_ref)), policy, "only about a Pod")
    refused(
        _as(cp, cluster["unbound"], "create", "-f", "-", stdin=_event(cluster, "pod-a", "node-a")),
        policy,
        "carry no",
    )
    # An administrator's Events are not the policy's business.
    allowed(cp.kubectl("create", "-f", "-", stdin=_event(cluster, "pod-b", "node-a"), check=False))


# ---- the certificate controller -----------------------------------------------------------------


def test_cert_controller_runs_and_changes_only_the_ca_bundle(
    control_plane: ControlPlane, cluster: dict[str, Any]
) -> None:
    cp, certs = control_plane, cluster["certs"]
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "thaw.cli",
            "certs",
            "--auto",
            "--once",
            "--kubeconfig",
            str(certs),
            "--dns",
            "thaw-webhook.thaw-system.svc",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    mwc = json.loads(cp.kubectl("get", "mutatingwebhookconfiguration", "thaw-webhook", "-o", "json").stdout)
    assert all(h["clientConfig"].get("caBundle") for h in mwc["webhooks"]), (
        "the real controller set no caBundle"
    )
    policy = "thaw-certs-ca-bundle-only"
    mwc_ = ("mutatingwebhookconfiguration", "thaw-webhook")

    def patch(ops: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        return _as(cp, certs, "patch", *mwc_, "--type=json", "-p", json.dumps(ops))

    bundle = mwc["webhooks"][0]["clientConfig"]["caBundle"]
    allowed(patch([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": bundle}]))
    for path, value in (
        ("/webhooks/0/failurePolicy", "Fail"),
        ("/webhooks/0/clientConfig/service/name", "elsewhere"),
        ("/webhooks/1/namespaceSelector", {}),
        ("/webhooks/0/rules/0/operations", ["CREATE", "UPDATE"]),
        ("/webhooks/1/matchConditions", [{"name": "all", "expression": "true"}]),
        ("/webhooks/0/timeoutSeconds", 30),
    ):
        refused(
            patch([{"op": "replace", "path": path, "value": value}]),
            policy,
            "only the webhooks' clientConfig.caBundle",
        )
    refused(patch([{"op": "remove", "path": "/webhooks/1"}]), policy, "add, remove, rename or reorder")
    refused(_as(cp, certs, "label", *mwc_, "x=y"), policy, "labels, annotations")
    refused(
        _as(cp, certs, "-n", NS, "create", "secret", "generic", "other", "--from-literal=a=b"),
        "thaw-certs-own-secrets",
        "not other",
    )
    # An administrator may still change the configuration.
    allowed(
        cp.kubectl(
            "patch",
            *mwc_,
            "--type=json",
            "-p",
            json.dumps([{"op": "replace", "path": "/webhooks/0/timeoutSeconds", "value": 4}]),
            check=False,
        )
    )


def test_every_mutating_webhook_field_is_compared_by_the_ca_bundle_policy() -> None:
    """A field Kubernetes adds to MutatingWebhook later must be added to the policy's comparison."""
    import kubernetes_validate
    import yaml

    schema_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    version = kubernetes_validate.latest_version()
    schema = schema_dir / f"v{version}-local-strict" / "mutatingwebhook-admissionregistration-v1.json"
    fields = set(json.loads(schema.read_text())["properties"]) - {"name", "clientConfig"}
    assert len(fields) >= 10, fields
    client = json.loads((schema.parent / "webhookclientconfig-admissionregistration-v1.json").read_text())
    client_fields = set(client["properties"]) - {"caBundle"}
    assert client_fields == {"url", "service"}, client_fields
    policy = next(
        d
        for d in yaml.safe_load_all(
            (Path(__file__).parents[2] / "manifests/overlays/default/cert-policy.yaml").read_text()
        )
        if d["kind"] == "ValidatingAdmissionPolicy" and d["metadata"]["name"] == "thaw-certs-ca-bundle-only"
    )
    text = json.dumps(policy["spec"]["validations"])
    for f in fields:
        assert f"o.?{f} == w.?{f}" in text, f"MutatingWebhook.{f} is not compared"
    for f in client_fields:
        assert f"o.clientConfig.?{f} == w.clientConfig.?{f}" in text, f"clientConfig.{f} is not compared"


# ---- the agent checks its policies --------------------------------------------------------------


def _agent_once(kubeconfig: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    facts = tmp / "facts.json"
    facts.write_text(
        json.dumps(
            {
                "arch": "x86_64",
                "kernel": "6.1.0",
                "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 8},
                "driver": "580.159.04",
                "criu": "4.2.1",
            }
        )
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "thaw.cli",
            "agent",
            "--cache",
            str(tmp / "cache"),
            "--budget",
            "1000000",
            "--node",
            "node-a",
            "--facts",
            str(facts),
            "--once",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(tmp)},
        check=False,
    )


def test_agent_runs_with_its_policies_and_refuses_without(
    control_plane: ControlPlane, cluster: dict[str, Any]
) -> None:
    cp, tmp = control_plane, cluster["tmp"]
    run = _agent_once(cluster["agent"], tmp)
    assert run.returncode == 0, run.stderr
    node = json.loads(cp.kubectl("get", "node", "node-a", "-o", "json").stdout)
    assert "thaw.dev/facts" in node["metadata"]["annotations"], run.stderr
    # Remove the events policy's binding: the agent must refuse to start, naming it.
    cp.kubectl("delete", "validatingadmissionpolicybinding", "thaw-agent-events")
    try:
        run = _agent_once(cluster["agent"], tmp)
        assert run.returncode == 1
        assert "ValidatingAdmissionPolicyBinding thaw-agent-events is missing" in run.stderr, run.stderr
        assert "--allow-without-node-policy" in run.stderr
        # Told explicitly, it runs, and makes only the write whose policy is in force.
        cp.kubectl("annotate", "node", "node-a", "thaw.dev/facts-", "thaw.dev/cache-")
        run = _agent_once(cluster["agent"], tmp, "--allow-without-node-policy")
        assert run.returncode == 0, run.stderr
        assert "running without thaw-agent-events" in run.stderr, run.stderr
        node = json.loads(cp.kubectl("get", "node", "node-a", "-o", "json").stdout)
        assert "thaw.dev/facts" in node["metadata"]["annotations"]
    finally:
        cp.apply(_render("default"))
