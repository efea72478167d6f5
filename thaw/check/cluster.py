"""``thaw check cluster``: is Thaw wired into this cluster so that pods restore?

Reads, through the API (a kubeconfig or in-cluster): the MutatingWebhookConfiguration and the
serving certificate its caBundle must verify; the webhook, extender and scheduler Deployments and
whether kube-apiserver reaches them; a dry-run pod admission (proof that kube-apiserver calls the
webhook over TLS with that caBundle); the agent's DaemonSet and admission policies; and, in every
namespace labelled ``thaw.dev/restore=allowed``, its Pod Security level, the trust and signing key
the webhook mounts from there (they must be in the pod's own namespace) and the store.

Each ``check_*`` judges objects already read (pure); :class:`Kube` and ``run_cluster`` read them.
Nothing is changed: the admission check is ``dryRun=All``, and secrets are only parsed for key ids
and certificate dates, never printed.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
import yaml

from thaw.check.lines import Line, fail, ok, warn
from thaw.contract.annotations import INJECTED, RESTORE_LABEL, RESTORE_LABEL_VALUE, SNAPSHOT

MIN_MINOR = 30  # ValidatingAdmissionPolicy v1 and the node-name claim (manifests/base/agent-policy.yaml)
CERT_MIN_DAYS = 14  # renewal is 30 days ahead (certctl, cert-manager): 14 left means it is failing
WEBHOOK_CONFIG = "thaw-webhook"
PATHS = {"/mutate", "/mutate-restore"}
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"


@dataclass
class Reply:
    status: int
    body: Any
    headers: Mapping[str, str]


class Kube:
    """Raw JSON GET/POST through the official client's authentication and TLS."""

    def __init__(self, api_client: Any) -> None:
        self.api = api_client

    def request(
        self, method: str, path: str, body: Any = None, query: Sequence[tuple[str, str]] = ()
    ) -> Reply:
        try:
            params = self.api.param_serialize(
                method,
                path,
                query_params=list(query),
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = self.api.call_api(*params, _request_timeout=10)
            raw, status, headers = resp.read(), resp.status, resp.getheaders()
        except Exception as exc:  # connection refused, TLS, DNS: the line says so
            return Reply(0, {"message": f"{type(exc).__name__}: {exc}"}, {})
        try:
            parsed = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        return Reply(int(status), parsed, dict(headers or {}))

    def get(self, path: str) -> Reply:
        return self.request("GET", path)


def _message(r: Reply) -> str:
    if isinstance(r.body, Mapping) and r.body.get("message"):
        return str(r.body["message"])
    return f"HTTP {r.status}"


# ---- pure judgements ------------------------------------------------------------------------------


def check_version(r: Reply) -> Line:
    if r.status != 200 or not isinstance(r.body, Mapping):
        return fail(
            "API server", f"cannot reach it: {_message(r)}", "check the kubeconfig (--kubeconfig, KUBECONFIG)"
        )
    version = str(r.body.get("gitVersion", "?"))
    minor = int(re.sub(r"\D.*", "", str(r.body.get("minor", "0"))) or 0)
    if minor < MIN_MINOR:
        return fail(
            "API server",
            f"Kubernetes {version}",
            "Thaw needs Kubernetes >= 1.30 (ValidatingAdmissionPolicy v1, the agent's node identity)",
        )
    return ok("API server", f"Kubernetes {version}")


def check_webhook_config(mwc: Reply) -> Line:
    name = "webhook registered"
    if mwc.status == 404:
        return fail(
            name,
            f"no MutatingWebhookConfiguration {WEBHOOK_CONFIG}",
            "kubectl apply -k manifests/overlays/default (or cert-manager)",
        )
    if mwc.status != 200 or not isinstance(mwc.body, Mapping):
        return fail(
            name,
            f"cannot read it: {_message(mwc)}",
            "run thaw check cluster with a kubeconfig that may read admissionregistration",
        )
    hooks = mwc.body.get("webhooks") or []
    paths = {_target(h)[1] for h in hooks}
    if not paths >= PATHS:
        return fail(
            name,
            f"entries for {sorted(p for p in paths if p)}, want /mutate and /mutate-restore",
            "apply manifests/base/mutatingwebhook.yaml unchanged",
        )
    empty = [h.get("name") for h in hooks if not (h.get("clientConfig") or {}).get("caBundle")]
    if empty:
        return fail(
            name,
            f"no caBundle on {', '.join(map(str, empty))}: kube-apiserver cannot call the webhook, so every "
            "pod is admitted unchanged",
            "check Deployment thaw-certs (kubectl -n thaw-system logs deploy/thaw-certs) or, with "
            "cert-manager, its cainjector",
        )
    return ok(name, f"{WEBHOOK_CONFIG}: {len(hooks)} entries, caBundle set")


def _target(hook: Mapping[str, Any]) -> tuple[str, str]:
    """(host, path) a webhook entry sends to: its Service's DNS name, or its URL's host."""
    cc = hook.get("clientConfig") or {}
    svc = cc.get("service")
    if isinstance(svc, Mapping):
        return f"{svc.get('name')}.{svc.get('namespace')}.svc", str(svc.get("path") or "/")
    url = urlsplit(str(cc.get("url") or ""))
    return url.hostname or "", url.path or "/"


def _certs(pem: bytes) -> list[Any]:
    from cryptography import x509

    try:
        return list(x509.load_pem_x509_certificates(pem))
    except ValueError:
        return []


def check_serving_cert(
    mwc: Mapping[str, Any], tls_crt: bytes | None, now: dt.datetime, why_unread: str = ""
) -> list[Line]:
    """The serving certificate verifies under every entry's caBundle, names each Service, and is not
    about to expire."""
    from cryptography import x509

    name = "webhook certificate"
    if tls_crt is None:
        return [
            warn(
                name,
                f"not checked: {why_unread}",
                "give thaw check a kubeconfig that may get Secret thaw-system/thaw-tls",
            )
        ]
    certs = _certs(tls_crt)
    if not certs:
        return [
            fail(
                name,
                "tls.crt of Secret thaw-tls is not a PEM certificate",
                "delete Secret thaw-tls: the certificate controller makes a new one",
            )
        ]
    leaf = certs[0]
    out: list[Line] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = set(san.get_values_for_type(x509.DNSName)) | {
            str(a) for a in san.get_values_for_type(x509.IPAddress)
        }
    except x509.ExtensionNotFound:
        sans = set()
    for hook in mwc.get("webhooks") or []:
        cc = hook.get("clientConfig") or {}
        host = _target(hook)[0]
        cas = _certs(base64.b64decode(cc.get("caBundle") or ""))
        if not any(_issued_by(leaf, ca) for ca in cas):
            out.append(
                fail(
                    name,
                    f"{hook.get('name')}: the serving certificate is not signed by a CA in its caBundle",
                    "kube-apiserver refuses the TLS handshake and admits pods unchanged: let the "
                    "certificate controller (or cert-manager's cainjector) update the caBundle",
                )
            )
        if host not in sans:
            out.append(
                fail(
                    name,
                    f"the serving certificate does not name {host} (it names {sorted(sans)})",
                    f"add --dns={host} to thaw certs --auto (or the Certificate's dnsNames)",
                )
            )
    days = (leaf.not_valid_after_utc - now).total_seconds() / 86400
    if days < CERT_MIN_DAYS:
        out.append(
            fail(
                name,
                f"expires in {days:.0f} days ({leaf.not_valid_after_utc:%Y-%m-%d})",
                "renewal is failing: check Deployment thaw-certs or cert-manager's Certificate thaw-serving",
            )
        )
    if not out:
        out.append(
            ok(
                name,
                f"verifies under the caBundle, names {', '.join(sorted(sans))}, expires in {days:.0f} days",
            )
        )
    return out


def _issued_by(cert: Any, ca: Any) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception):
        return False
    return True


def check_deployment(label: str, r: Reply, fix: str) -> Line:
    if r.status == 404:
        return fail(label, "not installed", fix)
    if r.status != 200 or not isinstance(r.body, Mapping):
        return fail(label, f"cannot read it: {_message(r)}", fix)
    want = int((r.body.get("spec") or {}).get("replicas", 1))
    ready = int((r.body.get("status") or {}).get("readyReplicas") or 0)
    if ready == 0:
        return fail(label, f"0 of {want} replicas ready", fix)
    return ok(label, f"{ready} of {want} replicas ready")


def check_proxy(label: str, r: Reply, fix: str) -> Line:
    if r.status == 200:
        return ok(label, "kube-apiserver reaches it: /readyz answered 200")
    return fail(label, f"/readyz through kube-apiserver: {_message(r)}", fix)


def check_dry_run(r: Reply, namespace: str, restore: bool) -> Line:
    name = "webhook admission"
    if r.status in (401, 403):
        return warn(
            name,
            f"dry-run pod create in {namespace} not allowed: {_message(r)}",
            "run thaw check cluster as someone who may create pods there",
        )
    if r.status not in (200, 201) or not isinstance(r.body, Mapping):
        return fail(
            name,
            f"dry-run pod create in {namespace} refused: {_message(r)}",
            "read the message: a policy, quota or the webhook refused the test pod",
        )
    annotations = (r.body.get("metadata") or {}).get("annotations") or {}
    warnings = " ".join(v for k, v in r.headers.items() if k.lower() == "warning")
    if restore and INJECTED in annotations:
        return ok(name, f"a dry-run pod in {namespace} was mutated by the webhook (thaw.dev/injected)")
    if not restore and "thaw" in warnings:
        return ok(
            name, f"a dry-run pod in {namespace} got the webhook's warning (namespace not restore-allowed)"
        )
    return fail(
        name,
        f"a dry-run pod in {namespace} was admitted unchanged: kube-apiserver could not call the webhook "
        "(failurePolicy Ignore hides why)",
        "check the caBundle, Service thaw-webhook and its endpoints, and any NetworkPolicy between the API "
        "server and port 8443; kube-apiserver's log names the error",
    )


def check_scheduler(config: Mapping[str, Any], scheduler: Reply | None) -> Line:
    name = "scheduler wiring"
    sched = config.get("scheduler") or {}
    second = sched.get("name")
    if second:
        if scheduler is None or scheduler.status == 404:
            return fail(
                name,
                f"the webhook sends Thaw pods to {second}, but Deployment thaw-scheduler is missing",
                "apply manifests/base/scheduler.yaml, or remove scheduler.name from thaw-webhook-config "
                "(default-scheduler wiring)",
            )
        line = check_deployment(
            name,
            scheduler,
            "Thaw pods stay Pending while no thaw-scheduler replica runs: kubectl -n thaw-system describe "
            "deploy thaw-scheduler",
        )
        if line.status == "ok":
            return ok(name, f"second scheduler {second}: {line.detail}")
        return line
    return warn(
        name,
        "default-scheduler wiring: its configuration cannot be read through the API",
        "check that kube-scheduler's KubeSchedulerConfiguration has the extenders entry of "
        "manifests/scheduler/ (docs/scheduler-wiring.md, 'The default scheduler')",
    )


def check_agent(ds: Reply, nodes_with_facts: int, policy_problems: Mapping[str, str]) -> list[Line]:
    out: list[Line] = []
    if ds.status != 200 or not isinstance(ds.body, Mapping):
        out.append(
            fail(
                "agent",
                f"DaemonSet thaw-agent: {_message(ds)}",
                "apply the manifests; the agent runs on nodes labelled nvidia.com/gpu.present=true",
            )
        )
    else:
        st = ds.body.get("status") or {}
        desired, ready = int(st.get("desiredNumberScheduled") or 0), int(st.get("numberReady") or 0)
        if desired == 0:
            out.append(
                fail(
                    "agent",
                    "DaemonSet thaw-agent runs on no node",
                    "label GPU nodes nvidia.com/gpu.present=true (GPU Feature Discovery does)",
                )
            )
        elif ready < desired:
            out.append(
                fail(
                    "agent",
                    f"{ready} of {desired} agents ready (ready: a pass reported the node)",
                    "kubectl -n thaw-system logs ds/thaw-agent: a refused policy, API or cache error",
                )
            )
        else:
            out.append(
                ok(
                    "agent",
                    f"{ready} of {desired} agents ready; {nodes_with_facts} nodes report thaw.dev/facts",
                )
            )
    if policy_problems:
        out.append(
            fail(
                "agent policies",
                "; ".join(policy_problems.values()),
                "apply manifests/base/agent-policy.yaml (Kubernetes >= 1.30): without it the agents refuse "
                "to run",
            )
        )
    else:
        out.append(ok("agent policies", "thaw-agent-own-node and thaw-agent-events in force"))
    return out


def check_pod_security(namespace: str, labels: Mapping[str, str]) -> Line:
    level = labels.get(PSA_ENFORCE)
    name = f"{namespace}: Pod Security"
    if level in (None, "privileged"):
        return ok(name, f"enforce {level or 'not set (the cluster default)'}")
    return fail(
        name,
        f"enforce {level}: refuses the hostPath volumes and capabilities a restore needs",
        f"kubectl label namespace {namespace} {PSA_ENFORCE}=privileged --overwrite",
    )


def public_key_ids(files: Mapping[str, bytes]) -> tuple[dict[str, str], list[str]]:
    """Key id -> file of every Ed25519 public key among ``files`` (a Secret's or ConfigMap's data),
    and the files that are not one."""
    from thaw.contract.signing import SigningKeyError, key_id, public_key_from_pem

    ids: dict[str, str] = {}
    bad: list[str] = []
    for fname, data in sorted(files.items()):
        try:
            ids[key_id(public_key_from_pem(data, fname))] = fname
        except SigningKeyError:
            bad.append(fname)
    return ids, bad


def private_key_id(data: bytes) -> str | None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from thaw.contract.signing import key_id

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return None
    return key_id(key.public_key()) if isinstance(key, Ed25519PrivateKey) else None


def check_trust(
    namespace: str, kind: str, obj_name: str, data: Mapping[str, bytes] | None, why: str = ""
) -> tuple[Line, dict[str, str]]:
    name = f"{namespace}: trust"
    create = (
        f"kubectl -n {namespace} create secret generic {obj_name} --from-file=signing.pub=keys/signing.pub"
        if kind == "Secret"
        else f"kubectl -n {namespace} create configmap {obj_name} --from-file=signing.pub=keys/signing.pub"
    )
    if data is None:
        return fail(
            name,
            f"{kind} {namespace}/{obj_name} {why or 'is missing'}: every fetch there refuses signed "
            "snapshots (cold starts, 'untrusted:')",
            create,
        ), {}
    ids, bad = public_key_ids(data)
    if not ids:
        return fail(
            name,
            f"{kind} {namespace}/{obj_name} holds no Ed25519 public key ({', '.join(bad) or 'empty'})",
            create,
        ), {}
    extra = f"; not keys: {', '.join(bad)}" if bad else ""
    return ok(name, f"{kind} {namespace}/{obj_name}: key(s) {', '.join(sorted(ids))}{extra}"), ids


def check_signing_key(  # noqa: PLR0917  (one namespace's reading, in the order read)
    namespace: str,
    secret: str,
    file: str,
    data: Mapping[str, bytes] | None,
    trusted: Mapping[str, str],
    why: str = "",
) -> Line:
    name = f"{namespace}: signing key"
    create = f"kubectl -n {namespace} create secret generic {secret} --from-file={file}=keys/signing.key"
    if data is None:
        return fail(
            name,
            f"Secret {namespace}/{secret} {why or 'is missing'}: pods there publish unsigned snapshots, "
            "which every node refuses",
            create,
        )
    raw = data.get(file)
    if raw is None:
        return fail(
            name,
            f"Secret {namespace}/{secret} has no {file} (keys: {', '.join(sorted(data)) or 'none'})",
            create,
        )
    kid = private_key_id(raw)
    if kid is None:
        return fail(
            name,
            f"{secret}/{file} is not an unencrypted PEM Ed25519 private key",
            f"make one with `thaw keys generate --out keys/` and: {create}",
        )
    if trusted and kid not in trusted:
        return fail(
            name,
            f"Secret {namespace}/{secret} signs as key {kid}, which the namespace's trust does not hold "
            f"({', '.join(sorted(trusted))})",
            "put this key's signing.pub into the trust Secret/ConfigMap: its snapshots are refused as "
            "untrusted otherwise",
        )
    return ok(name, f"Secret {namespace}/{secret}: key {kid}" + (", trusted" if trusted else ""))


def check_store(namespace: str, store: Mapping[str, Any], pvc: Reply | None) -> Line:
    name = f"{namespace}: store"
    if "claimName" in store:
        claim = store["claimName"]
        if pvc is None or pvc.status == 404:
            return fail(
                name,
                f"PersistentVolumeClaim {namespace}/{claim} is missing",
                f"create a ReadWriteMany PVC {claim} in {namespace} (the webhook mounts the store from the "
                "pod's namespace)",
            )
        if pvc.status != 200 or not isinstance(pvc.body, Mapping):
            return fail(
                name,
                f"PVC {namespace}/{claim}: {_message(pvc)}",
                "give thaw check a kubeconfig that may read PVCs",
            )
        phase = (pvc.body.get("status") or {}).get("phase")
        modes = (pvc.body.get("spec") or {}).get("accessModes") or []
        if phase != "Bound":
            return fail(
                name, f"PVC {namespace}/{claim} is {phase}", "bind it to a volume (kubectl describe pvc)"
            )
        if "ReadWriteMany" not in modes:
            return fail(
                name,
                f"PVC {namespace}/{claim} is {', '.join(modes)}: only one node can mount it",
                "use a ReadWriteMany volume (NFS, CephFS, a CSI file store) or an OCI registry",
            )
        return ok(name, f"PVC {namespace}/{claim}: Bound, ReadWriteMany")
    if "hostPath" in store:
        return warn(
            name,
            f"hostPath {store['hostPath']}: each node has its own store, so only the node that took a "
            "snapshot restores it",
            "for a cluster, set store.claimName (a ReadWriteMany PVC) or a registry in thaw-webhook-config",
        )
    return ok(name, f"{', '.join(f'{k}: {v}' for k, v in store.items())}")


# ---- reading ----------------------------------------------------------------------------------------


def _data(obj: Mapping[str, Any], secret: bool) -> dict[str, bytes]:
    if secret:
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    out = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
    out.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return out


def _read_data(kube: Kube, namespace: str, kind: str, name: str) -> tuple[dict[str, bytes] | None, str]:
    plural = "secrets" if kind == "Secret" else "configmaps"
    r = kube.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
    if r.status == 404:
        return None, "is missing"
    if r.status != 200 or not isinstance(r.body, Mapping):
        return None, f"cannot be read ({_message(r)})"
    return _data(r.body, kind == "Secret"), ""


def test_pod(namespace: str) -> dict[str, Any]:
    """The pod the admission check creates with dryRun=All: opted in, valid, nothing to run."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"thaw-check-{uuid.uuid4().hex[:8]}",
            "namespace": namespace,
            "annotations": {SNAPSHOT: "thaw-check"},
        },
        "spec": {
            "containers": [
                {
                    "name": "server",
                    "image": "registry.invalid/thaw-check:dry-run",
                    "command": ["/server"],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8000}},
                }
            ]
        },
    }


def run_cluster(
    api_client: Any, namespace: str = "thaw-system", now: dt.datetime | None = None
) -> list[Line]:
    from thaw.node.policy import policy_problems

    kube = Kube(api_client)
    now = now or dt.datetime.now(dt.UTC)
    version = kube.get("/version")
    lines = [check_version(version)]
    if version.status != 200:
        return lines
    ns = f"/apis/apps/v1/namespaces/{namespace}"
    mwc = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK_CONFIG}")
    lines.append(check_webhook_config(mwc))
    if mwc.status == 200 and isinstance(mwc.body, Mapping):
        tls, why = _read_data(kube, namespace, "Secret", "thaw-tls")
        lines.extend(
            check_serving_cert(
                mwc.body,
                (tls or {}).get("tls.crt") if tls else None,
                now,
                f"Secret {namespace}/thaw-tls {why}",
            )
        )
    lines.append(
        check_deployment(
            "webhook",
            kube.get(f"{ns}/deployments/thaw-webhook"),
            f"kubectl -n {namespace} describe deploy thaw-webhook",
        )
    )
    lines.append(
        check_proxy(
            "webhook reachable",
            kube.get(f"/api/v1/namespaces/{namespace}/services/https:thaw-webhook:443/proxy/readyz"),
            f"Service {namespace}/thaw-webhook has no ready endpoint, or a NetworkPolicy blocks the API "
            "server",
        )
    )
    cm = kube.get(f"/api/v1/namespaces/{namespace}/configmaps/thaw-webhook-config")
    config: dict[str, Any] = {}
    if cm.status == 200 and isinstance(cm.body, Mapping):
        loaded = yaml.safe_load((cm.body.get("data") or {}).get("config.yaml") or "{}")
        config = loaded if isinstance(loaded, dict) else {}
    else:
        lines.append(
            fail(
                "webhook config",
                f"ConfigMap {namespace}/thaw-webhook-config: {_message(cm)}",
                "apply manifests/base/webhook.yaml",
            )
        )
    sched_name = (config.get("scheduler") or {}).get("name")
    lines.append(
        check_scheduler(config, kube.get(f"{ns}/deployments/thaw-scheduler") if sched_name else None)
    )
    lines.append(
        check_deployment(
            "extender",
            kube.get(f"{ns}/deployments/thaw-extender"),
            f"kubectl -n {namespace} describe deploy thaw-extender",
        )
    )
    lines.append(
        check_proxy(
            "extender reachable",
            kube.get(f"/api/v1/namespaces/{namespace}/services/https:thaw-extender:8444/proxy/readyz"),
            "the extender is not ready (its node watch has not synced) or has no endpoint: kubectl -n "
            "thaw-system logs deploy/thaw-extender",
        )
    )
    nodes = kube.get("/api/v1/nodes")
    with_facts = (
        sum(
            1
            for n in (nodes.body or {}).get("items") or []
            if "thaw.dev/facts" in ((n.get("metadata") or {}).get("annotations") or {})
        )
        if isinstance(nodes.body, Mapping)
        else 0
    )
    lines.extend(
        check_agent(kube.get(f"{ns}/daemonsets/thaw-agent"), with_facts, policy_problems(api_client))
    )

    selector = quote(f"{RESTORE_LABEL}={RESTORE_LABEL_VALUE}")
    listed = kube.get(f"/api/v1/namespaces?labelSelector={selector}")
    restore_ns = (
        [n for n in (listed.body or {}).get("items") or []] if isinstance(listed.body, Mapping) else []
    )
    target = restore_ns[0]["metadata"]["name"] if restore_ns else "default"
    dry = kube.request(
        "POST", f"/api/v1/namespaces/{target}/pods", body=test_pod(target), query=[("dryRun", "All")]
    )
    lines.append(check_dry_run(dry, target, bool(restore_ns)))
    if not restore_ns:
        lines.append(
            fail(
                "restore namespaces",
                "no namespace is labelled thaw.dev/restore=allowed: every Thaw pod cold-starts",
                "kubectl label namespace NS thaw.dev/restore=allowed",
            )
        )
        return lines
    trust_cfg = config.get("trust") or {"secretName": "thaw-trust"}
    trust_kind, trust_name = (
        ("ConfigMap", trust_cfg["configMapName"])
        if "configMapName" in trust_cfg
        else ("Secret", trust_cfg.get("secretName", "thaw-trust"))
    )
    key_cfg = config.get("signingKey", {"secretName": "thaw-signing-key"})
    store = config.get("store") or {"hostPath": "/var/lib/thaw/store"}
    for n in restore_ns:
        name = n["metadata"]["name"]
        lines.append(check_pod_security(name, n["metadata"].get("labels") or {}))
        data, why = _read_data(kube, name, trust_kind, trust_name)
        trust_line, trusted = check_trust(name, trust_kind, trust_name, data, why)
        lines.append(trust_line)
        if key_cfg is not None:
            secret = key_cfg.get("secretName", "thaw-signing-key")
            kdata, kwhy = _read_data(kube, name, "Secret", secret)
            lines.append(
                check_signing_key(name, secret, key_cfg.get("file", "signing.key"), kdata, trusted, kwhy)
            )
        pvc = (
            kube.get(f"/api/v1/namespaces/{name}/persistentvolumeclaims/{store['claimName']}")
            if "claimName" in store
            else None
        )
        lines.append(check_store(name, store, pvc))
    return lines
