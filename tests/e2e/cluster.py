"""A real Kubernetes 1.36 cluster on this machine, with Thaw wired into it as an operator would.

The control plane (etcd, kube-apiserver, kube-scheduler) and the node (kubelet, containerd, runc, a
CNI bridge) come from the workplace's ``../shared/tools/k8s-control-plane`` and ``k8s-node``, found
beside the repository (the CI checkout has the same sibling). Thaw's webhook, extender and
thaw-scheduler run on the host, each configured from the shipped manifests (manifests/base) with only
what a host process must change: the webhook's and the extender's addresses become
``https://127.0.0.1:PORT`` URLs, the scheduler's kubeconfig and CA file are files here. The node
agent runs as the cluster runs it: a pod of the shipped DaemonSet's template, on the node, with the
shipped ServiceAccount, RBAC and ValidatingAdmissionPolicies and the token kubelet mounts for it
(bound to its pod, so it carries the node's name). The node's runtime copies, cache and store are
directories of this run.

Everything here does I/O; the test reads as the path a pod takes (tests/e2e/test_real_pods.py).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.images import REPO

SHARED_TOOLS = REPO.parent / "shared" / "tools"
CONTROL_PLANE = SHARED_TOOLS / "k8s-control-plane"
NODE = SHARED_TOOLS / "k8s-node"
# Kept between runs (unpacked binaries, etcd, PKI); every run starts from a wiped etcd and node.
STATE = REPO / ".tools" / "e2e"
NODE_NAME = "thaw-node"
CONTAINERD = "/run/containerd/containerd.sock"
HOST_CRIU = REPO / ".tools" / "criu" / "bin" / "criu"
THAW = REPO / ".venv" / "bin" / "thaw"
KUBECTL = REPO / ".venv" / "bin" / "kubectl"
MANIFESTS = REPO / "manifests" / "base"
THAW_NAMESPACE = "thaw-system"
AGENT_POD = f"thaw-agent-{NODE_NAME}"
# What the ServiceAccount admission plugin adds to a pod (it is off on this control plane, which has
# no controller-manager): the token kubelet requests for the pod (TokenRequest, bound to the pod, so
# kube-apiserver records the pod's node in it), the cluster's CA and the namespace.
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
SA_VOLUME = {
    "name": "kube-api-access",
    "projected": {
        "defaultMode": 0o644,
        "sources": [
            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [
                        {
                            "path": "namespace",
                            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                        }
                    ]
                }
            },
        ],
    },
}

T = TypeVar("T")
# One line per test for the terminal summary (tests/e2e/conftest.py): what CI's log shows.
SUMMARY: list[str] = []


def unavailable() -> str | None:
    """Why the real cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the real node (kubelet, containerd) runs as root"
    for tool in (CONTROL_PLANE, NODE):
        if not os.access(tool, os.X_OK):
            return f"{tool} is missing (the workplace's ../shared/tools beside the repository)"
    if not os.access(HOST_CRIU, os.X_OK):
        return f"{HOST_CRIU} is missing: run `make criu`"
    if not os.access(THAW, os.X_OK):
        return f"{THAW} is missing: run `make venv`"
    return None


def sh(cmd: Sequence[str | Path], timeout: float = 600, env: Mapping[str, str] | None = None) -> str:
    """Run a command; a failure fails the test with its output."""
    args = [str(c) for c in cmd]
    try:
        out = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} did not finish within {timeout:.0f} s", pytrace=False)
    if out.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} failed (exit {out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}",
            pytrace=False,
        )
    return out.stdout


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    every: float = 0.25,
    explain: Callable[[], str] | None = None,
) -> T:
    """The first truthy ``check()`` within ``timeout`` seconds, else a failure naming ``what`` (and
    what ``explain()`` says about the state of things)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            more = f":\n{explain()}" if explain else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{more}", pytrace=False)
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostProcess:
    """A Thaw server started on the host for this run, in its own process group (gunicorn's workers)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, cmd: Sequence[str | Path], log: Path, env: Mapping[str, str]) -> HostProcess:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **env},
                start_new_session=True,
            )
        return cls(name, proc, log)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited ({self.proc.returncode}):\n{self.tail()}", pytrace=False)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this run started, by its id
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def https_get(url: str, ca: Path, timeout: float = 2) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


@dataclass
class Cluster:
    """The control plane and the node, started once per session."""

    cp: Path = STATE / "cp"
    node: Path = STATE / "node"

    @property
    def kubeconfig(self) -> Path:
        return self.cp / "admin.kubeconfig"

    @property
    def scheduler_kubeconfig(self) -> Path:
        return self.cp / "scheduler.kubeconfig"

    @property
    def ca(self) -> Path:
        return self.cp / "pki" / "ca.crt"

    def apiserver_port(self) -> int:
        server = str(yaml.safe_load(self.kubeconfig.read_text())["clusters"][0]["cluster"]["server"])
        return int(server.rsplit(":", 1)[1])

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        """kubectl as the cluster's admin; a failure fails the test with its message."""
        out = self._kubectl(args, stdin)
        if out is None or out.returncode != 0:
            why = "did not finish within 120 s" if out is None else f"failed: {out.stderr[-3000:]}"
            pytest.fail(f"kubectl {' '.join(args)} {why}", pytrace=False)
        return out.stdout

    def kubectl_or_none(self, *args: str) -> str | None:
        """kubectl's output, or None where it failed (for polling and diagnostics)."""
        out = self._kubectl(args, None)
        return out.stdout if out is not None and out.returncode == 0 else None

    def _kubectl(self, args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str] | None:
        cmd = [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args]
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, check=False)
        except subprocess.TimeoutExpired:
            return None

    def up(self) -> None:
        """Start from a clean slate whatever a previous run left (processes, etcd data, pods)."""
        self.down(wipe=True)
        sh([CONTROL_PLANE, "setup", self.cp], timeout=600)
        sh([CONTROL_PLANE, "up", self.cp], timeout=180)
        sh([NODE, "up", self.cp, self.node], timeout=600)

    def down(self, wipe: bool = False) -> None:
        extra = ["--wipe"] if wipe else []
        if not (self.cp / "admin.kubeconfig").exists():
            return  # never set up here: nothing of ours can be running
        if (self.node / "pids").exists() or wipe:
            sh([NODE, "down", self.cp, self.node, *extra], timeout=180)
        sh([CONTROL_PLANE, "down", self.cp, *extra], timeout=120)

    def start_scheduler(self, config: Path) -> None:
        out = sh([CONTROL_PLANE, "scheduler", self.cp, config], timeout=120)
        if "healthz: ok" not in out:
            log = (self.cp / "logs" / "kube-scheduler.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"kube-scheduler did not become healthy: {out}\n{log}", pytrace=False)

    def scheduler_log(self) -> str:
        return (self.cp / "logs" / "kube-scheduler.log").read_text(errors="replace")

    def import_image(self, archive: Path) -> None:
        sh(["ctr", "--address", CONTAINERD, "-n", "k8s.io", "images", "import", archive], timeout=600)

    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]


@dataclass
class Thaw:
    """Thaw's pieces on the host, wired into the cluster as the default install wires them."""

    cluster: Cluster
    run: Path  # this run's directory: certificates, keys, configs, logs, node cache, store
    thaw_image: str  # what the webhook puts into pods (imagePullPolicy Never: imported, not pulled)
    processes: list[HostProcess] = field(default_factory=list)
    webhook_port: int = 0
    extender_port: int = 0
    agent_metrics_port: int = 0

    @property
    def certs(self) -> Path:
        return self.run / "tls"

    @property
    def keys(self) -> Path:
        return self.run / "keys"

    @property
    def cache(self) -> Path:
        return self.run / "cache"

    @property
    def store(self) -> Path:
        return self.run / "store"

    @property
    def runtime(self) -> Path:
        return self.run / "runtime"

    @property
    def logs(self) -> Path:
        return self.run / "logs"

    def _env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "THAW_CRIU": str(HOST_CRIU),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        for d in (self.logs, self.keys, self.cache, self.store, self.runtime):
            d.mkdir(parents=True, exist_ok=True)
        ca_bundle = sh(
            [THAW, "certs", "--out", self.certs, "--dns", "localhost", "--ip", "127.0.0.1"]
        ).strip()
        sh([THAW, "keys", "generate", "--out", self.keys])
        self.webhook_port, self.extender_port = free_port(), free_port()
        self._start_webhook()
        self._start_extender()
        self._register_webhook(ca_bundle.splitlines()[-1])
        self.cluster.start_scheduler(self._scheduler_config())
        self._start_agent()
        self.wait_agent_ready()

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    def process(self, name: str) -> HostProcess:
        return next(p for p in self.processes if p.name == name)

    # --- the pieces ---------------------------------------------------------------------------

    def webhook_config(self) -> dict[str, Any]:
        """The shipped ConfigMap thaw-webhook-config (the second scheduler, a hostPath store: one
        node), with the image imported into the node and this run's runtime, cache and store
        directories instead of the host's /var/lib/thaw."""
        config: dict[str, Any] = yaml.safe_load(_manifest_data("webhook.yaml", "thaw-webhook-config"))
        assert "hostPath" in config["store"], config["store"]  # a one-node store: right for one node
        config.update(
            image=self.thaw_image,
            imagePullPolicy="Never",
            runtime={"hostPath": str(self.runtime)},
            cache={"hostPath": str(self.cache)},
            store={"hostPath": str(self.store)},
        )
        return config

    def _start_webhook(self) -> None:
        path = self.run / "webhook-config.yaml"
        path.write_text(yaml.safe_dump(self.webhook_config()))
        self._serve("webhook", self.webhook_port, "--config", str(path))

    def _start_extender(self) -> None:
        # Its metrics count the calls (with placement "preferred" a filter call logs nothing).
        self._serve("extender", self.extender_port)

    def _serve(self, name: str, port: int, *extra: str) -> None:
        cmd = [str(THAW), name, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--cert-dir", str(self.certs), "--workers", "1", "--threads", "2", *extra]
        self.processes.append(HostProcess.start(name, cmd, self.logs / f"{name}.log", self._env()))
        self._wait_ready(name, f"https://127.0.0.1:{port}/readyz")

    def _start_agent(self) -> None:
        """The shipped agent, as a pod of its DaemonSet's template on the node (this control plane
        runs no DaemonSet controller, so the pod is created bound to the node, as that controller
        would have it), with manifests/base/agent.yaml's ServiceAccount and RBAC and
        agent-policy.yaml's policies, which the agent checks at start against its own identity."""
        docs = [d for f in ("namespace.yaml", "agent.yaml", "agent-policy.yaml") for d in _manifests(f)]
        rest = [d for d in docs if d["kind"] != "DaemonSet"]
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rest))
        # What kube-controller-manager's root-ca-cert-publisher puts in every namespace.
        ca = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "kube-root-ca.crt", "namespace": THAW_NAMESPACE},
            "data": {"ca.crt": self.cluster.ca.read_text()},
        }
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(ca))
        # The DaemonSet runs on nodes labelled as GPU Feature Discovery labels GPU nodes
        # (docs/install.md, step 4: label them yourself without it).
        self.cluster.kubectl("label", "node", NODE_NAME, "nvidia.com/gpu.present=true", "--overwrite")
        (daemonset,) = [d for d in docs if d["kind"] == "DaemonSet"]
        self.agent_metrics_port = free_port()
        pod = agent_pod(
            daemonset, self.thaw_image, self.cache, self.cluster.apiserver_port(), self.agent_metrics_port
        )
        self.cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pod))

    def agent_log(self) -> str:
        return self.cluster.kubectl_or_none("-n", THAW_NAMESPACE, "logs", AGENT_POD, "-c", "agent") or ""

    def wait_agent_ready(self, timeout: float = 120) -> None:
        """The agent pod Ready: its /readyz answers once a pass has reported the node."""

        def ready() -> bool:
            jsonpath = "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
            return (
                self.cluster.kubectl_or_none("-n", THAW_NAMESPACE, "get", "pod", AGENT_POD, "-o", jsonpath)
                == "True"
            )

        def why() -> str:
            status = self.cluster.kubectl_or_none("-n", THAW_NAMESPACE, "get", "pod", AGENT_POD, "-o", "yaml")
            return f"{status}\n--- agent log:\n{self.agent_log()[-4000:]}"

        wait_for(f"agent pod {AGENT_POD} Ready", ready, timeout, every=0.5, explain=why)

    def _wait_ready(self, name: str, url: str) -> None:
        proc = self.process(name)

        def ready() -> bool:
            proc.check_alive()
            return https_get(url, self.certs / "ca.crt")[0] == 200

        wait_for(f"{name} at {url}", ready, timeout=60)

    def _register_webhook(self, ca_bundle: str) -> None:
        """manifests/base/mutatingwebhook.yaml, both entries, each pointed at the host's webhook."""
        doc = yaml.safe_load((MANIFESTS / "mutatingwebhook.yaml").read_text())
        base64.b64decode(ca_bundle, validate=True)  # the last line `thaw certs` prints
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{self.webhook_port}{path}",
                "caBundle": ca_bundle,
            }
        from kubernetes import client

        api = client.AdmissionregistrationV1Api(self.cluster.api_client())
        api.create_mutating_webhook_configuration(doc)

    def _scheduler_config(self) -> Path:
        """The shipped thaw-scheduler configuration, its extender reached on the host."""
        config = yaml.safe_load(_manifest_data("scheduler.yaml", "thaw-scheduler-config"))
        config["leaderElection"] = {"leaderElect": False}  # one replica here
        config["clientConnection"] = {"kubeconfig": str(self.cluster.scheduler_kubeconfig)}
        (extender,) = config["extenders"]
        extender["urlPrefix"] = f"https://127.0.0.1:{self.extender_port}"
        extender["tlsConfig"] = {"caFile": str(self.certs / "ca.crt")}
        path = self.run / "scheduler-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def extender_requests(self, verb: str) -> float:
        """``thaw_extender_requests_total`` answered 200 for ``verb`` (filter, prioritize) so far."""
        status, text = https_get(f"https://127.0.0.1:{self.extender_port}/metrics", self.certs / "ca.crt")
        assert status == 200, text
        for line in text.splitlines():
            if (
                line.startswith("thaw_extender_requests_total{")
                and f'verb="{verb}"' in line
                and 'code="200"' in line
            ):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def scheduler_name(self) -> str:
        name = self.webhook_config()["scheduler"]["name"]
        assert isinstance(name, str)
        return name


def agent_pod(
    daemonset: Mapping[str, Any], image: str, cache: Path, apiserver_port: int, metrics_port: int
) -> dict[str, Any]:
    """The DaemonSet's pod on NODE_NAME, with what this machine's cluster must change, each for the
    reason said; everything else (user, capabilities, read-only root, probes, RBAC) as shipped."""
    template = json.loads(json.dumps(daemonset["spec"]["template"]))
    spec = template["spec"]
    spec["nodeName"] = NODE_NAME
    # kube-apiserver listens on 127.0.0.1 only and no kube-proxy runs here: the pod reaches it on
    # the host's loopback (in-cluster config reads KUBERNETES_SERVICE_HOST/PORT, which win over the
    # service links kubelet sets).
    spec["hostNetwork"] = True
    spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    (container,) = spec["containers"]
    container["image"], container["imagePullPolicy"] = image, "Never"
    # One pass a second (the shipped 30 s would make the test wait); metrics on a free port of the
    # host (host network).
    args = [a for a in container["args"] if not a.startswith("--metrics-port=")]
    container["args"] = [*args, f"--metrics-port={metrics_port}", "--interval=1"]
    for port in container["ports"]:
        if port["name"] == "metrics":
            port["containerPort"] = metrics_port
    container["env"] += [
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": str(apiserver_port)},
    ]
    container["volumeMounts"].append({"name": SA_VOLUME["name"], "mountPath": SA_DIR, "readOnly": True})
    for volume in spec["volumes"]:
        if volume["name"] == "cache":
            volume["hostPath"]["path"] = str(cache)
    spec["volumes"].append(json.loads(json.dumps(SA_VOLUME)))
    meta = {**template["metadata"], "name": AGENT_POD, "namespace": daemonset["metadata"]["namespace"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def _manifests(file: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MANIFESTS / file).read_text()) if d]


def _manifest_data(file: str, config_map: str, key: str = "config.yaml") -> str:
    for doc in yaml.safe_load_all((MANIFESTS / file).read_text()):
        if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == config_map:
            data = doc["data"][key]
            assert isinstance(data, str)
            return data
    raise AssertionError(f"no ConfigMap {config_map} in {MANIFESTS / file}")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
