"""``thaw check``: each line's judgement (pure), the node checks on this machine, and the cluster
checks against a real kube-apiserver 1.36 with Thaw installed from the manifests, working and
then broken one way at a time."""

from __future__ import annotations

import base64
import datetime as dt
import json
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from extender.launch import extender_command
from tests.controlplane import ControlPlane
from tests.manifests.test_manifests import _render
from tests.needs import require, root
from thaw.check import cluster as cc
from thaw.check import node as cn
from thaw.check.lines import Line, exit_code, fail, ok, render, warn
from thaw.dev.sandbox import stop, thaw_cli, thaw_command, thaw_env, wait_for
from thaw.serve.serving import free_port

GIB = 1 << 30


# ---- lines ------------------------------------------------------------------------------------------


def test_a_failing_line_must_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="without saying what to do"):
        Line("x", "FAIL", "broken")
    lines = [ok("a", "fine"), warn("b", "meh", "look"), fail("c", "broken", "fix it")]
    text = render(lines)
    assert "FAIL  c  broken\n         -> fix it" in text
    assert text.endswith("3 checks: 1 ok, 1 warnings, 1 failed\n")
    assert exit_code(lines) == 1 and exit_code(lines[:2]) == 0


# ---- node: judgements ---------------------------------------------------------------------------------


def test_node_judgements() -> None:
    assert cn.check_kernel("6.8.0-60-generic").status == "ok"
    assert cn.check_kernel("5.4.0-1").status == "FAIL"
    assert cn.check_criu_version(None, None, "criu not found").status == "FAIL"
    assert cn.check_criu_version("/c", "3.17.1", None).status == "FAIL"
    assert cn.check_criu_version("/c", "4.2.1", None).status == "ok"
    assert (
        cn.check_criu_check(0, "Warn: x\nLooks good.\n", True).detail
        == "criu check --unprivileged: Looks good."
    )
    bad = cn.check_criu_check(1, "Error (criu/cr-check.c:1): seccomp\n", False)
    assert bad.status == "FAIL" and "seccomp" in bad.detail
    both = 1 << cn.CAP_CHECKPOINT_RESTORE | 1 << cn.CAP_SYS_PTRACE
    assert cn.check_capabilities(both).status == "ok"
    line = cn.check_capabilities(1 << cn.CAP_SYS_PTRACE)
    assert line.status == "FAIL" and "CHECKPOINT_RESTORE" in line.detail and "restore=allowed" in line.fix
    assert cn.check_ptrace_scope("3\n").status == "FAIL"
    assert cn.check_ptrace_scope("1\n").status == "ok"
    assert cn.check_driver("none", 0, "none").status == "FAIL"
    assert cn.check_driver("550.54.15", 8, "H100").status == "FAIL"
    assert cn.check_driver("580.159.04", 8, "NVIDIA-H200").status == "ok"
    assert cn.check_cuda_api("libcuda.so.1 lacks cuCheckpointProcessRestore").status == "FAIL"


def _cache(**kw: Any) -> cn.CacheFacts:
    base: dict[str, Any] = {
        "path": Path("/var/lib/thaw/cache"),
        "exists": True,
        "is_dir": True,
        "uid": 0,
        "mode": 0o40700,
        "fstype": "ext4",
        "free": 500 * GIB,
        "total": 1000 * GIB,
    }
    return cn.CacheFacts(**{**base, **kw})


def test_cache_judgements() -> None:
    assert {line.status for line in cn.check_cache(_cache(), 50 * GIB, 400 * GIB)} == {"ok"}
    lines = {
        line.name: line
        for line in cn.check_cache(_cache(mode=0o40755, free=GIB, fstype="overlay"), 50 * GIB, 2000 * GIB)
    }
    assert lines["cache permissions"].status == "FAIL" and "chmod 0700" in lines["cache permissions"].fix
    assert lines["cache filesystem"].status == "FAIL" and "overlay" in lines["cache filesystem"].detail
    assert lines["cache free space"].status == "FAIL"
    assert lines["cache budget"].status == "warn"
    [missing] = cn.check_cache(_cache(exists=False), 1, None)
    assert missing.status == "warn"


def test_thaw_check_node_on_this_machine(tmp_path: Path) -> None:
    """The real command: CRIU, criu check and the capabilities pass here (root, the bundled CRIU);
    this machine has no GPU, so the driver and CUDA lines fail, and the exit code says so."""
    require(root("criu check and the capability line"))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    out = thaw_cli("check", "node", "--cache", cache, "--min-free", "1", timeout=120)
    lines = {
        row.split()[1]: row.split()[0]
        for row in out.stdout.splitlines()
        if row[:4].strip() in ("ok", "warn", "FAIL")
    }
    assert lines["kernel"] == "ok" and lines["criu"] == "ok", out.stdout
    assert lines["capabilities"] == "ok", out.stdout
    assert "ok    criu check" in out.stdout, out.stdout
    assert "cache permissions" in out.stdout and "FAIL  cache" not in out.stdout, out.stdout
    has_gpu = Path("/proc/driver/nvidia/version").exists()
    assert (lines["driver"] == "ok") == has_gpu
    assert out.returncode == (0 if has_gpu else 1)


# ---- cluster: against a real kube-apiserver ----------------------------------------------------------


def host_ip() -> str | None:
    """An address of this host that is not loopback: kube-apiserver's service proxy refuses
    loopback endpoints, as it would in a cluster."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent; it picks the outgoing address
            ip = str(s.getsockname()[0])
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


NS = "thaw-system"
APP = "llm"


@contextmanager
def serving(cmd: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in thaw_env().items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def _key_secret(name: str, key_file: Path) -> list[str]:
    """kubectl's arguments for the README's step: Secret ``name`` in the app's namespace holding
    ``key_file`` under its own name."""
    return ["-n", APP, "create", "secret", "generic", name, f"--from-file={key_file.name}={key_file}"]


def _secret(name: str, namespace: str, files: dict[str, bytes]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in files.items()},
    }


def _endpoints(name: str, ip: str, port: int) -> list[dict[str, Any]]:
    """What the endpoints controllers would write for a Service whose pod (``name``-host, made by
    ``_host_pod``) serves on ip:port. kube-apiserver's service proxy follows only addresses whose
    targetRef is a pod with that IP."""
    ref = {"kind": "Pod", "namespace": NS, "name": f"{name}-host"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": name, "namespace": NS},
            "subsets": [
                {
                    "addresses": [{"ip": ip, "targetRef": ref}],
                    "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
                }
            ],
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": NS,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    ]


def _host_pod(cp: ControlPlane, name: str, ip: str) -> None:
    """The pod behind a Service, running on this host: its status as kubelet would write it."""
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"{name}-host", "namespace": NS},
                "spec": {
                    "nodeName": "gpu-1",
                    "containers": [{"name": "c", "image": "registry.invalid/thaw"}],
                },
            }
        ]
    )
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    cp.kubectl(
        "-n",
        NS,
        "patch",
        "pod",
        f"{name}-host",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def _set_status(cp: ControlPlane, kind: str, name: str, status: dict[str, Any]) -> None:
    """No kubelet or controller-manager here: the status their controllers would write."""
    cp.kubectl(
        "-n",
        NS,
        "patch",
        kind,
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


@pytest.fixture(scope="module")
def installed(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Thaw installed as the README says, its webhook and extender served from this host."""
    ip = host_ip()
    require(
        None if ip else "this host has no non-loopback address for the API server's service proxy to reach"
    )
    assert ip is not None
    cp, tmp = control_plane, tmp_path_factory.mktemp("installed")
    cp.apply(_render("default"))
    tls = tmp / "tls"
    thaw_cli(
        "certs", "--out", tls, "--ip", ip,
        "--dns", "thaw-webhook.thaw-system.svc", "--dns", "thaw-extender.thaw-system.svc", check=True,
    )  # fmt: skip
    files = {f: (tls / f).read_bytes() for f in ("ca.crt", "tls.crt", "tls.key")}
    keys = tmp / "keys"
    thaw_cli("keys", "generate", "--out", keys, check=True)
    labels = {"thaw.dev/restore": "allowed", "pod-security.kubernetes.io/enforce": "privileged"}
    cp.apply(
        [
            _secret("thaw-tls", NS, files),
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APP, "labels": labels}},
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": "gpu-1", "annotations": {"thaw.dev/facts": "{}"}},
            },
        ]
    )
    # The signing steps (docs/install.md, step 3; docs/signing.md), in the pods' own namespace.
    cp.kubectl(*_key_secret("thaw-signing-key", keys / "signing.key"))
    cp.kubectl(*_key_secret("thaw-trust", keys / "signing.pub"))
    hook_port, ext_port = free_port(), free_port()
    nodes = tmp / "nodes.json"
    nodes.write_text(
        json.dumps(
            {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1"}, "items": []}
        )
    )
    config = tmp / "webhook.yaml"
    cm = json.loads(cp.kubectl("-n", NS, "get", "cm", "thaw-webhook-config", "-o", "json").stdout)
    config.write_text(cm["data"]["config.yaml"])
    webhook = [*thaw_command(), "webhook", "--host", "0.0.0.0", "--port", str(hook_port)]
    webhook += ["--cert-dir", str(tls), "--config", str(config), "--workers", "1", "--threads", "2"]
    extender = extender_command(ext_port, nodes, "--cert-dir", str(tls))
    extender[extender.index("--host") + 1] = "0.0.0.0"
    with serving(webhook, tmp / "webhook.log") as hook, serving(extender, tmp / "extender.log") as ext:
        # kube-apiserver dials a service clientConfig by its DNS name, which this host cannot resolve:
        # the entries point at the webhook by URL, with the same caBundle the controller would set.
        mwc = json.loads(
            cp.kubectl("get", "mutatingwebhookconfiguration", "thaw-webhook", "-o", "json").stdout
        )
        bundle = base64.b64encode(files["ca.crt"]).decode()
        ops = []
        for i, h in enumerate(mwc["webhooks"]):
            path = h["clientConfig"]["service"]["path"]
            ops.append(
                {
                    "op": "replace",
                    "path": f"/webhooks/{i}/clientConfig",
                    "value": {"url": f"https://{ip}:{hook_port}{path}", "caBundle": bundle},
                }
            )
        cp.kubectl(
            "patch", "mutatingwebhookconfiguration", "thaw-webhook", "--type=json", "-p", json.dumps(ops)
        )
        for name in ("thaw-webhook", "thaw-extender"):
            _host_pod(cp, name, ip)
        cp.apply(_endpoints("thaw-webhook", ip, hook_port) + _endpoints("thaw-extender", ip, ext_port))
        for name in ("thaw-webhook", "thaw-extender", "thaw-scheduler"):
            _set_status(cp, "deployment", name, {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2})
        _set_status(
            cp,
            "daemonset",
            "thaw-agent",
            {
                "desiredNumberScheduled": 1,
                "numberReady": 1,
                "currentNumberScheduled": 1,
                "numberMisscheduled": 0,
            },
        )
        wait_for(
            lambda: (
                hook.poll() is None and ext.poll() is None and _open(ip, hook_port) and _open(ip, ext_port)
            ),
            30,
            "the webhook and extender to serve",
        )
        yield {"cp": cp, "tmp": tmp, "keys": keys, "hook": hook, "ip": ip}


def _open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=1):
            return True
    except OSError:
        return False


def check(cp: ControlPlane) -> tuple[int, dict[str, list[Line]]]:
    lines = cc.run_cluster(cp.api_client(), NS)
    by: dict[str, list[Line]] = {}
    for line in lines:
        by.setdefault(line.name, []).append(line)
    return exit_code(lines), by


def test_a_working_install_passes(installed: dict[str, Any]) -> None:
    cp = installed["cp"]
    code, by = check(cp)
    text = render([line for lines in by.values() for line in lines])
    assert code == 0, text
    names = ["API server", "webhook registered", "webhook certificate", "webhook", "webhook reachable"]
    names += ["webhook admission", "scheduler wiring", "extender", "extender reachable", "agent"]
    names += ["agent policies", f"{APP}: Pod Security", f"{APP}: trust", f"{APP}: signing key"]
    for name in names:
        assert [line.status for line in by[name]] == ["ok"], text
    assert "mutated by the webhook" in by["webhook admission"][0].detail
    assert ", trusted" in by[f"{APP}: signing key"][0].detail
    assert by[f"{APP}: store"][0].status == "warn"  # the shipped hostPath store: one node's only
    # The command prints the same and exits 0.
    out = thaw_cli("check", "cluster", "--kubeconfig", cp.kubeconfig, timeout=120)
    assert out.returncode == 0 and "0 failed" in out.stdout, out.stdout + out.stderr


@contextmanager
def broken(cp: ControlPlane, *kubectl: list[str], restore: list[list[str]]) -> Iterator[None]:
    for args in kubectl:
        cp.kubectl(*args)
    try:
        yield
    finally:
        for args in restore:
            cp.kubectl(*args)


def failing(cp: ControlPlane, name: str) -> Line:
    code, by = check(cp)
    assert code == 1
    lines = [line for line in by.get(name, []) if line.status == "FAIL"]
    assert lines, render([x for xs in by.values() for x in xs])
    return lines[0]


def test_a_namespace_without_trust_fails_with_the_command_to_fix_it(installed: dict[str, Any]) -> None:
    cp, keys = installed["cp"], installed["keys"]
    recreate = _key_secret("thaw-trust", keys / "signing.pub")
    with broken(cp, ["-n", APP, "delete", "secret", "thaw-trust"], restore=[recreate]):
        line = failing(cp, f"{APP}: trust")
        assert "is missing" in line.detail and line.fix.startswith(
            f"kubectl -n {APP} create secret generic thaw-trust"
        )


def test_a_signing_key_the_namespace_does_not_trust_fails(installed: dict[str, Any]) -> None:
    cp, tmp, keys = installed["cp"], installed["tmp"], installed["keys"]
    other = tmp / "other-keys"
    thaw_cli("keys", "generate", "--out", other, check=True)
    swap = _key_secret("thaw-signing-key", other / "signing.key")
    back = _key_secret("thaw-signing-key", keys / "signing.key")
    with broken(
        cp,
        ["-n", APP, "delete", "secret", "thaw-signing-key"],
        swap,
        restore=[["-n", APP, "delete", "secret", "thaw-signing-key"], back],
    ):
        line = failing(cp, f"{APP}: signing key")
        assert "which the namespace's trust does not hold" in line.detail


def test_a_wrong_ca_bundle_fails_the_certificate_and_the_admission(installed: dict[str, Any]) -> None:
    cp, tmp = installed["cp"], installed["tmp"]
    other = tmp / "other-ca"
    thaw_cli("certs", "--out", other, "--dns", "x", check=True)
    mwc = json.loads(cp.kubectl("get", "mutatingwebhookconfiguration", "thaw-webhook", "-o", "json").stdout)
    good = mwc["webhooks"][0]["clientConfig"]["caBundle"]
    wrong = base64.b64encode((other / "ca.crt").read_bytes()).decode()

    def set_bundle(value: str) -> list[str]:
        ops = [
            {"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": value}
            for i in range(len(mwc["webhooks"]))
        ]
        return ["patch", "mutatingwebhookconfiguration", "thaw-webhook", "--type=json", "-p", json.dumps(ops)]

    with broken(cp, set_bundle(wrong), restore=[set_bundle(good)]):
        cert = failing(cp, "webhook certificate")
        assert "not signed by a CA in its caBundle" in cert.detail
        admission = failing(cp, "webhook admission")
        assert "admitted unchanged" in admission.detail


def test_baseline_pod_security_and_a_missing_policy_fail(installed: dict[str, Any]) -> None:
    cp = installed["cp"]
    psa = "pod-security.kubernetes.io/enforce"
    with broken(
        cp,
        ["label", "ns", APP, f"{psa}=baseline", "--overwrite"],
        restore=[["label", "ns", APP, f"{psa}=privileged", "--overwrite"]],
    ):
        line = failing(cp, f"{APP}: Pod Security")
        assert line.fix == f"kubectl label namespace {APP} {psa}=privileged --overwrite"
    with broken(cp, ["delete", "validatingadmissionpolicybinding", "thaw-agent-own-node"], restore=[]):
        line = failing(cp, "agent policies")
        assert "ValidatingAdmissionPolicyBinding thaw-agent-own-node is missing" in line.detail
    cp.apply(
        [
            d
            for d in yaml.safe_load_all(_render("default"))
            if d and d["kind"].startswith("ValidatingAdmission")
        ]
    )


def test_a_scheduler_down_and_a_webhook_gone_fail(installed: dict[str, Any]) -> None:
    cp = installed["cp"]
    _set_status(cp, "deployment", "thaw-scheduler", {"readyReplicas": 0, "availableReplicas": 0})
    try:
        line = failing(cp, "scheduler wiring")
        assert "0 of 2 replicas ready" in line.detail and "Pending" in line.fix
    finally:
        _set_status(cp, "deployment", "thaw-scheduler", {"readyReplicas": 2, "availableReplicas": 2})
    hook = installed["hook"]
    hook.terminate()
    hook.wait(10)
    line = failing(cp, "webhook reachable")
    assert "/readyz through kube-apiserver" in line.detail
    assert failing(cp, "webhook admission").status == "FAIL"


def test_the_certificate_judgement_counts_days(installed: dict[str, Any]) -> None:
    cp = installed["cp"]
    mwc = json.loads(cp.kubectl("get", "mutatingwebhookconfiguration", "thaw-webhook", "-o", "json").stdout)
    secret = json.loads(cp.kubectl("-n", NS, "get", "secret", "thaw-tls", "-o", "json").stdout)
    crt = base64.b64decode(secret["data"]["tls.crt"])
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=360)
    [line] = cc.check_serving_cert(mwc, crt, later, "")
    assert line.status == "FAIL" and "expires in" in line.detail
