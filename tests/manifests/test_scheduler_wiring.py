"""The default-scheduler wiring: components/default-scheduler and manifests/scheduler/ agree with the
rest, and a real kube-scheduler 1.36 started with manifests/scheduler/kube-scheduler-config.yaml
calls a real ``thaw extender`` by IP, verifying its certificate by tlsConfig.serverName (the way a
static kube-scheduler on the host network reaches it, without cluster DNS)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from extender.launch import extender_command
from tests.controlplane import ControlPlane
from tests.manifests.test_manifests import (
    MANIFESTS,
    args_of,
    find,
    flag,
    ksc_problems,
    kubectl,
    render,
    scheduler_config,
)
from thaw.dev.sandbox import stop, thaw_cli, thaw_env, wait_for
from thaw.serve.serving import free_port

STATIC = MANIFESTS / "scheduler" / "kube-scheduler-config.yaml"
PATCH = MANIFESTS / "scheduler" / "kubeadm-patches" / "kube-scheduler+json.yaml"
SCHEDULER_OBJECTS = {"thaw-scheduler", "thaw-scheduler-config"}


def with_component(overlay: str, tmp: Path) -> list[dict[str, Any]]:
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS / "overlays" / overlay, tmp)],
                "components": [os.path.relpath(MANIFESTS / "components" / "default-scheduler", tmp)],
            }
        )
    )
    out = subprocess.run([kubectl(), "kustomize", str(tmp)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def static_config() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(STATIC.read_text())
    return doc


@pytest.mark.parametrize("overlay", ["default", "cert-manager"])
def test_the_component_replaces_the_second_scheduler(overlay: str, tmp_path: Path) -> None:
    import kubernetes_validate

    objs = with_component(overlay, tmp_path)
    assert not [o for o in objs if o["metadata"]["name"].startswith("thaw-scheduler")]
    base = yaml.safe_load(find(render(overlay), "ConfigMap", "thaw-webhook-config")["data"]["config.yaml"])
    mine = yaml.safe_load(find(objs, "ConfigMap", "thaw-webhook-config")["data"]["config.yaml"])
    expected = copy.deepcopy(base)
    del expected["scheduler"]["name"]
    assert mine == expected, "the component's webhook configuration must be the base's without scheduler.name"
    for o in objs:
        if o["apiVersion"].split("/")[0] != "cert-manager.io":
            kubernetes_validate.validate(o, "1.30", strict=True)


def test_the_static_scheduler_config_reaches_the_extender_without_dns(tmp_path: Path) -> None:
    cfg = static_config()
    assert ksc_problems(cfg) == []
    [ext] = cfg["extenders"]
    objs = with_component("default", tmp_path)
    svc = find(objs, "Service", "thaw-extender")
    url = urlsplit(ext["urlPrefix"])
    assert url.hostname == svc["spec"]["clusterIP"], (
        "urlPrefix must be the extender Service's fixed ClusterIP"
    )
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    server_name = ext["tlsConfig"]["serverName"]
    assert server_name == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert server_name in flag(args_of(render("default"), "Deployment", "thaw-certs"), "dns")
    assert server_name in find(render("cert-manager"), "Certificate", "thaw-serving")["spec"]["dnsNames"]
    # The second scheduler's entry, key for key, but where it is and how its name is checked.
    [second] = scheduler_config(render("default"))["extenders"]
    strip = ("urlPrefix", "tlsConfig")
    assert {k: v for k, v in ext.items() if k not in strip} == {
        k: v for k, v in second.items() if k not in strip
    }
    # The kubeadm patch mounts the directory the config and the CA are read from, and passes --config.
    ops = yaml.safe_load(PATCH.read_text())
    [arg] = [o["value"] for o in ops if o["path"] == "/spec/containers/0/command/-"]
    [mount] = [o["value"] for o in ops if o["path"] == "/spec/containers/0/volumeMounts/-"]
    [volume] = [o["value"] for o in ops if o["path"] == "/spec/volumes/-"]
    assert arg == f"--config={mount['mountPath']}/{STATIC.name}"
    assert Path(ext["tlsConfig"]["caFile"]).parent == Path(mount["mountPath"])
    assert volume["name"] == mount["name"] and volume["hostPath"]["path"] == mount["mountPath"]


def _metric(port: int, verb: str) -> float:
    text = (
        urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", context=_ctx, timeout=5).read().decode()
    )
    total = 0.0
    for line in text.splitlines():
        if (
            line.startswith("thaw_extender_requests_total{")
            and f'verb="{verb}"' in line
            and 'code="200"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


_ctx: Any = None


def test_a_real_kube_scheduler_calls_the_extender_by_ip_with_server_name(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    global _ctx
    import ssl

    cp = control_plane
    tls = tmp_path / "tls"
    # The serving certificate names the Service only, as the shipped controllers make it: no IP.
    thaw_cli("certs", "--out", tls, "--dns", "thaw-extender.thaw-system.svc", check=True)
    _ctx = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    _ctx.check_hostname = False  # the test's own reads of /metrics, by IP
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1"}},
    }
    nodes = tmp_path / "nodes.json"
    nodes.write_text(
        json.dumps(
            {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": [node]}
        )
    )
    port = free_port()
    cmd = extender_command(port, nodes, "--cert-dir", str(tls))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=thaw_env())
    try:
        wait_for(lambda: _up(port), 30, "the extender")
        cfg = static_config()
        cfg["clientConnection"] = {"kubeconfig": str(cp.dir / "scheduler.kubeconfig")}
        cfg["leaderElection"] = {"leaderElect": False}
        [ext] = cfg["extenders"]
        ext["urlPrefix"] = f"https://127.0.0.1:{port}"  # an IP, as the ClusterIP is
        ext["tlsConfig"]["caFile"] = str(tls / "ca.crt")
        path = tmp_path / "kube-scheduler-config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cp.apply([node])
        status = {
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}],
        }
        cp.kubectl(
            "patch",
            "node",
            "n1",
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": status}),
        )
        # First without serverName (the control): by IP the certificate cannot verify, the call is
        # skipped (ignorable) and the pod is still scheduled, but the extender answers nothing.
        bare = copy.deepcopy(cfg)
        del bare["extenders"][0]["tlsConfig"]["serverName"]
        (tmp_path / "bare.yaml").write_text(yaml.safe_dump(bare))
        _schedule(cp, tmp_path / "bare.yaml", "p0")
        assert _metric(port, "filter") == 0
        _stop_scheduler(cp)
        # Then as shipped: the same calls, verified by serverName, reach the extender. Its counter
        # is written just after its answer; once p1's call is counted, a call for p0 (seconds
        # earlier) would be too: exactly one filter call (one node), none before it.
        _schedule(cp, path, "p1")
        log = cp.dir / "logs" / "kube-scheduler.log"
        wait_for(lambda: _metric(port, "filter") >= 1, 10, "the extender to count p1's filter call")
        assert _metric(port, "filter") == 1, log.read_text()[-3000:]
    finally:
        stop(proc)


def _schedule(cp: ControlPlane, config: Path, pod_name: str) -> None:
    """Start kube-scheduler with ``config`` and wait until it binds a new pod to n1."""
    out = cp.script("scheduler", str(cp.dir), str(config), timeout=120)
    assert "healthz: ok" in out, (cp.dir / "logs" / "kube-scheduler.log").read_text()[-3000:]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/x"}]},
    }
    cp.apply([pod])
    wait_for(
        lambda: cp.kubectl("get", "pod", pod_name, "-o", "jsonpath={.spec.nodeName}").stdout == "n1",
        60,
        f"pod {pod_name} to be bound to n1",
        interval=0.2,
    )


def _stop_scheduler(cp: ControlPlane) -> None:
    """Stop the kube-scheduler this test started (by the pid the script recorded)."""
    pid_file = cp.dir / "pids" / "kube-scheduler.pid"
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30, "kube-scheduler to stop")
    pid_file.unlink()


def _up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", context=_ctx, timeout=2).read()
        return True
    except OSError:
        return False
