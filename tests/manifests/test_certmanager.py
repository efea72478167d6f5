"""The self-managed certificate path (thaw certs --auto) against a fake kube-apiserver."""

from __future__ import annotations

import base64
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests.fakekube_objects import FakeObjects
from thaw.cli import main
from thaw.serve.certctl import CertController, Health, Settings, bundle, plan
from thaw.serve.tls import ReloadingContext, generate

NS = "thaw-system"
DNS = ("thaw-webhook.thaw-system.svc", "thaw-extender.thaw-system.svc")
MWC = "mutatingwebhookconfigurations"


def _mwc() -> dict[str, Any]:
    hook = {
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "clientConfig": {
            "service": {"name": "thaw-webhook", "namespace": NS, "path": "/mutate", "port": 443}
        },
    }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "thaw-webhook"},
        "webhooks": [{**hook, "name": "restore.thaw.dev"}, {**hook, "name": "admit.thaw.dev"}],
    }


@pytest.fixture
def kube() -> Iterator[FakeObjects]:
    fake = FakeObjects().start()
    fake.put(MWC, _mwc())
    yield fake
    fake.stop()


def _secret(kube: FakeObjects, name: str) -> dict[str, bytes]:
    obj = kube.get("secrets", name, NS)
    assert obj is not None, f"Secret {name} was not created"
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}


def _bundles(kube: FakeObjects) -> list[bytes]:
    obj = kube.get(MWC, "thaw-webhook")
    assert obj is not None
    return [base64.b64decode(h["clientConfig"]["caBundle"]) for h in obj["webhooks"]]


def _handshake(cert_dir: Path, ca_bundle: bytes, server_name: str) -> None:
    """A real TLS handshake: a server on cert_dir, a client trusting only ca_bundle."""
    ctx = ReloadingContext(cert_dir).current()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = ssl.create_default_context(cadata=ca_bundle.decode())
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        client.wrap_socket(raw, server_hostname=server_name) as s,
    ):
        assert s.recv(2) == b"ok"
    t.join(5)
    listener.close()


def test_first_reconcile_creates_ca_serving_cert_and_ca_bundle(kube: FakeObjects, tmp_path: Path) -> None:
    ctl = CertController(Settings(NS, DNS), kube.api_client(), tmp_path / "tls")
    result = ctl.reconcile()
    assert result.new_ca and result.new_serving

    ca = _secret(kube, "thaw-ca")
    tls = _secret(kube, "thaw-tls")
    assert set(ca) == {"ca.crt", "ca.key"}
    assert set(tls) == {"ca.crt", "tls.crt", "tls.key"}
    assert kube.get("secrets", "thaw-tls", NS)["type"] == "kubernetes.io/tls"  # type: ignore[index]
    assert "ca.key" not in tls, "the CA key must stay out of the Secret the servers mount"
    assert _bundles(kube) == [ca["ca.crt"], ca["ca.crt"]]
    cert = x509.load_pem_x509_certificate(tls["tls.crt"])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca["ca.crt"]))
    # The files the servers read, and a real handshake for both Service names.
    for name in DNS:
        _handshake(tmp_path / "tls", _bundles(kube)[0], name)


def test_second_reconcile_writes_nothing(kube: FakeObjects) -> None:
    ctl = CertController(Settings(NS, DNS), kube.api_client())
    ctl.reconcile()
    writes = [r for r in kube.requests if not r.startswith("GET")]
    result = ctl.reconcile()
    assert result.reason == ""
    assert [r for r in kube.requests if not r.startswith("GET")] == writes


def test_renewal_keeps_ca_and_rotates_serving_cert(kube: FakeObjects) -> None:
    ctl = CertController(Settings(NS, DNS), kube.api_client())
    ctl.reconcile()
    before_ca, before_tls = _secret(kube, "thaw-ca"), _secret(kube, "thaw-tls")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=89 - 29)  # 29 days left of 90: renew
    result = ctl.reconcile(now=soon)
    assert not result.new_ca and result.new_serving and "expires" in result.reason
    after_tls = _secret(kube, "thaw-tls")
    assert _secret(kube, "thaw-ca") == before_ca
    assert after_tls["tls.crt"] != before_tls["tls.crt"] and after_tls["tls.key"] != before_tls["tls.key"]
    assert after_tls["ca.crt"] == before_tls["ca.crt"]
    assert _bundles(kube) == [before_ca["ca.crt"]] * 2


def test_ca_rotation_trusts_new_ca_before_serving_with_it(kube: FakeObjects) -> None:
    ctl = CertController(Settings(NS, DNS, ca_days=200), kube.api_client())
    ctl.reconcile()
    old_ca = _secret(kube, "thaw-ca")["ca.crt"]
    n = len(kube.requests)
    result = ctl.reconcile(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=100))  # < 90 + 30 left
    assert result.new_ca
    new_ca = _secret(kube, "thaw-ca")
    assert new_ca["ca.crt"] != old_ca and new_ca["previous.crt"] == old_ca
    # Both CAs trusted while the old one is valid, and the caBundle changed before thaw-tls did.
    for b in _bundles(kube):
        assert old_ca in b and new_ca["ca.crt"] in b
    writes = [r for r in kube.requests[n:] if not r.startswith("GET")]
    assert writes.index(
        "PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/thaw-webhook"
    ) < (writes.index(f"PUT /api/v1/namespaces/{NS}/secrets/thaw-tls"))


def test_conflicting_writer_is_read_again(kube: FakeObjects) -> None:
    """Two controllers race on the first create: the loser gets 409, reads again, keeps the winner's CA."""
    a = CertController(Settings(NS, DNS), kube.api_client())
    b = CertController(Settings(NS, DNS), kube.api_client())
    original = b._read_secret
    raced = {"done": False}

    def read_then_lose(name: str) -> tuple[dict[str, str] | None, str | None]:
        found = original(name)
        if name == "thaw-tls" and not raced["done"]:
            raced["done"] = True
            a.reconcile()  # a creates both Secrets after b saw none
        return found

    b._read_secret = read_then_lose  # type: ignore[method-assign]
    b.reconcile()
    assert raced["done"]
    assert f"POST /api/v1/namespaces/{NS}/secrets" in kube.requests
    ca = _secret(kube, "thaw-ca")
    assert _bundles(kube) == [ca["ca.crt"]] * 2
    cert = x509.load_pem_x509_certificate(_secret(kube, "thaw-tls")["tls.crt"])
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca["ca.crt"]))


def test_stale_resource_version_is_a_conflict_then_retried(kube: FakeObjects) -> None:
    ctl = CertController(Settings(NS, DNS), kube.api_client())
    ctl.reconcile()
    original = ctl._read_secret

    calls = {"n": 0}

    def stale(name: str) -> tuple[dict[str, str] | None, str | None]:
        data, rv = original(name)
        calls["n"] += 1
        if name == "thaw-tls" and calls["n"] <= 2:
            return data, "1"  # someone wrote since: the PUT must get 409, then re-read
        return data, rv

    ctl._read_secret = stale  # type: ignore[method-assign]
    result = ctl.reconcile(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=70))
    assert result.new_serving
    assert calls["n"] >= 4, "a 409 must lead to a second read"


def test_plan_reasons() -> None:
    s = Settings(NS, DNS)
    now = dt.datetime.now(dt.UTC)
    gen, _, _ = generate(list(DNS), days=90, ca_days=3650)
    other, _, _ = generate(["other.example"], days=90)
    assert plan(s, None, None, None, None, now).new_ca
    assert plan(s, gen.ca_pem, b"k", None, None, now) == plan(s, gen.ca_pem, b"k", None, None, now)
    assert plan(s, gen.ca_pem, b"k", None, None, now).reason == "no serving certificate yet"
    assert plan(s, gen.ca_pem, b"k", gen.cert_pem, gen.key_pem, now).reason == ""
    assert "not signed" in plan(s, gen.ca_pem, b"k", other.cert_pem, other.key_pem, now).reason
    names = Settings(NS, (*DNS, "extra.svc"))
    assert "names" in plan(names, gen.ca_pem, b"k", gen.cert_pem, gen.key_pem, now).reason
    assert plan(s, gen.ca_pem, b"k", gen.cert_pem, gen.key_pem, now + dt.timedelta(days=61)).new_serving


def test_bundle_drops_expired_previous_ca() -> None:
    now = dt.datetime.now(dt.UTC)
    a, _, _ = generate(["a"], days=1, ca_days=10)
    b, _, _ = generate(["b"], days=1, ca_days=10)
    assert bundle(a.ca_pem, b.ca_pem, now).count(b"BEGIN CERTIFICATE") == 2
    assert bundle(a.ca_pem, b.ca_pem, now + dt.timedelta(days=11)) == a.ca_pem
    assert bundle(a.ca_pem, None, now) == a.ca_pem


def test_health_goes_bad_after_missed_reconciles() -> None:
    t = {"now": 0.0}
    h = Health(interval_s=10, clock=lambda: t["now"])
    assert h.live() and not h.ready()
    h.ok()
    assert h.ready()
    t["now"] = 59
    assert h.live()
    t["now"] = 61
    assert not h.live()


def test_cli_auto_once(kube: FakeObjects, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters: [{{name: fake, cluster: {{server: '{kube.url}'}}}}]\n"
        "users: [{name: fake, user: {token: t}}]\n"
        "contexts: [{name: fake, context: {cluster: fake, user: fake}}]\n"
    )
    argv = ["certs", "--auto", "--once", "--kubeconfig", str(kubeconfig), "--out", str(tmp_path / "out")]
    for name in DNS:
        argv += ["--dns", name]
    assert main(argv) == 0
    assert (tmp_path / "out" / "tls.crt").read_bytes() == _secret(kube, "thaw-tls")["tls.crt"]
    assert main(["certs", "--auto", "--once", "--kubeconfig", str(kubeconfig)]) == 2  # no --dns


def test_cli_manual_still_needs_out(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--dns", "x"]) == 2
    assert "--out" in capsys.readouterr().err
