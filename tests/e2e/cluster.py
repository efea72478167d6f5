"""A real Kubernetes 1.36 cluster on this machine, with Thaw wired into it as an operator would.

The control plane (etcd, kube-apiserver, kube-scheduler) and the node (kubelet, containerd, runc, a
CNI bridge) come from the workplace's ``../shared/tools/k8s-control-plane`` and ``k8s-node``, found
beside the repository (the CI checkout has the same sibling). Thaw's servers run on the host, each
configured from the shipped manifests (manifests/base) with only what a host process must change:
the webhook's and the extender's addresses become ``https://127.0.0.1:PORT`` URLs, the scheduler's
kubeconfig and CA file are files here, the node cache and store are directories of this run.

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
MANIFESTS = REPO / "manifests" / "base"

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
    def logs(self) -> Path:
        return self.run / "logs"

    def _env(self) -> dict[str, str]:
        return {
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "THAW_CRIU": str(HOST_CRIU),
            "PYTHONUNBUFFERED": "1",
        }

    def start(self) -> None:
        for d in (self.logs, self.keys, self.cache, self.store):
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
        self._apply_agent_policies()
        self._start_agent()

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    def process(self, name: str) -> HostProcess:
        return next(p for p in self.processes if p.name == name)

    # --- the pieces ---------------------------------------------------------------------------

    def webhook_config(self) -> dict[str, Any]:
        """The shipped ConfigMap thaw-webhook-config (second scheduler, extended resource), with the
        image imported into the node and this run's cache and store directories."""
        config: dict[str, Any] = yaml.safe_load(_manifest_data("webhook.yaml", "thaw-webhook-config"))
        config.update(
            image=self.thaw_image,
            imagePullPolicy="Never",
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

    def _apply_agent_policies(self) -> None:
        """manifests/base/agent-policy.yaml, as shipped: the agent refuses to run without its policies
        (they narrow only the agent's ServiceAccount; the agent here runs with the admin's credentials)."""
        from kubernetes import client

        api = client.AdmissionregistrationV1Api(self.cluster.api_client())
        for doc in yaml.safe_load_all((MANIFESTS / "agent-policy.yaml").read_text()):
            if doc and doc["kind"] == "ValidatingAdmissionPolicy":
                api.create_validating_admission_policy(doc)
            elif doc and doc["kind"] == "ValidatingAdmissionPolicyBinding":
                api.create_validating_admission_policy_binding(doc)

    def _start_agent(self) -> None:
        cmd = [str(THAW), "agent", "--cache", str(self.cache), "--budget", str(20 * 10**9)]
        cmd += ["--node", NODE_NAME, "--interval", "1", "--heartbeat", str(self.run / "agent.alive")]
        self.processes.append(HostProcess.start("agent", cmd, self.logs / "agent.log", self._env()))

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


def _manifest_data(file: str, config_map: str, key: str = "config.yaml") -> str:
    for doc in yaml.safe_load_all((MANIFESTS / file).read_text()):
        if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == config_map:
            data = doc["data"][key]
            assert isinstance(data, str)
            return data
    raise AssertionError(f"no ConfigMap {config_map} in {MANIFESTS / file}")


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)
