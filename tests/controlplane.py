"""A real kube-apiserver 1.36 (with etcd) on loopback, for tests that need the server's own
validation and admission: ``../shared/tools/k8s-control-plane`` (tests/e2e/cluster.py drives the same
script with a node; this is the control plane alone, on free ports, in seconds).

``control_plane`` is a module-scoped fixture: binaries and PKI are kept under ``.tools/apiserver``
between runs, etcd's data is wiped at each start. Where the tools cannot run, ``require`` skips the
test with the reason, or fails it when ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.images import REPO
from tests.needs import require
from thaw.serve.serving import free_port

CONTROL_PLANE = REPO.parent / "shared" / "tools" / "k8s-control-plane"
STATE = REPO / ".tools" / "apiserver"


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the control plane script runs as root (it fetches etcd with apt-get)"
    if not os.access(CONTROL_PLANE, os.X_OK):
        return f"{CONTROL_PLANE} is missing (the workplace's ../shared/tools beside the repository)"
    for tool in ("curl", "xz", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing: scripts/ensure-tools installs it"
    return None


@dataclass
class ControlPlane:
    dir: Path
    env: dict[str, str]

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.env['K8S_APISERVER_PORT']}"

    @property
    def ca(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    def script(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run(
            [str(CONTROL_PLANE), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
            check=False,
        )
        if out.returncode != 0:
            pytest.fail(
                f"k8s-control-plane {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
            )
        return out.stdout

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        from tests.manifests.test_manifests import kubectl

        out = subprocess.run(
            [kubectl(), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and out.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed: {out.stderr}")
        return out

    def apply(self, docs: Sequence[dict[str, Any]] | str) -> None:
        text = docs if isinstance(docs, str) else yaml.safe_dump_all(list(docs))
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text)

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))  # type: ignore[no-untyped-call]

    def token_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig that authenticates with ``token`` (a ServiceAccount's, as a pod would)."""
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "t",
                            "cluster": {"server": self.server, "certificate-authority": str(self.ca)},
                        }
                    ],
                    "users": [{"name": "t", "user": {"token": token}}],
                    "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                    "current-context": "t",
                }
            )
        )
        return path

    def token(self, namespace: str, service_account: str, bound_pod: str | None = None) -> str:
        """A token of ``service_account`` (TokenRequest), bound to ``bound_pod`` when given: then
        kube-apiserver records the pod's node in its extra info, as for the token kubelet mounts."""
        args = ["-n", namespace, "create", "token", service_account]
        if bound_pod:
            args += ["--bound-object-kind", "Pod", "--bound-object-name", bound_pod]
        return self.kubectl(*args).stdout.strip()


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    require(unavailable())
    STATE.mkdir(parents=True, exist_ok=True)
    env = {
        "K8S_APISERVER_PORT": str(free_port()),
        "K8S_ETCD_PORT": str(free_port()),
        "K8S_ETCD_PEER_PORT": str(free_port()),
        "K8S_SCHEDULER_PORT": str(free_port()),
    }
    cp = ControlPlane(STATE, env)
    cp.script("down", str(STATE), "--wipe", timeout=60)  # whatever a killed run left
    cp.script("setup", str(STATE), timeout=600)
    out = cp.script("up", str(STATE), timeout=180)
    if "readyz: ok" not in out:
        log = (STATE / "logs" / "kube-apiserver.log").read_text(errors="replace")[-3000:]
        cp.script("down", str(STATE), "--wipe", timeout=60)
        pytest.fail(f"kube-apiserver did not become ready: {out}\n{log}")
    try:
        yield cp
    finally:
        cp.script("down", str(STATE), "--wipe", timeout=60)
