"""End to end: ``thaw webhook`` under real gunicorn over real HTTPS, verified with the CA from
``thaw certs``; certificate rotation without a restart and without a failed request."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import load_fixture
from tests.webhook.helpers import annotated
from thaw.serve.tls import ReloadingContext, write_cert_dir
from webhook.app import MAX_BODY_BYTES
from webhook.launch import Running, make_certs, running_webhook, worker_admissions

REVIEW = annotated(load_fixture("admissionreview-v1-pod-create.request.json"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("webhook")
    with running_webhook(make_certs(base / "certs"), workers=2) as run:
        yield run


def connect(run: Running) -> http.client.HTTPSConnection:
    host, port = run.url.removeprefix("https://").split(":")
    return http.client.HTTPSConnection(host, int(port), context=run.ssl_context(), timeout=10)


def post(conn: http.client.HTTPSConnection, path: str, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def test_mutate_restore_injects_over_https(server: Running) -> None:
    conn = connect(server)
    status, body = post(conn, "/mutate-restore", json.dumps(REVIEW).encode())
    assert status == 200
    response = json.loads(body)["response"]
    assert response["uid"] == REVIEW["request"]["uid"] and response["allowed"] is True
    ops = json.loads(base64.b64decode(response["patch"]))
    assert {"op": "add", "path": "/metadata/annotations/thaw.dev~1injected", "value": "v2"} in ops
    # the same connection is kept alive for the next review (gthread keep-alive)
    status, body = post(conn, "/mutate", json.dumps(REVIEW).encode())
    response = json.loads(body)["response"]
    assert status == 200 and "patch" not in response and "thaw.dev/restore=allowed" in response["warnings"][0]
    conn.close()


def test_connections_spread_over_the_workers(server: Running) -> None:
    """Each worker has its own SO_REUSEPORT socket: 32 kept-alive connections land on both workers
    (with one shared socket they could all pile onto one: issue 15). All on one worker by chance:
    probability 2 * 2**-32."""

    def per_worker() -> dict[str, float]:
        conn = connect(server)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return worker_admissions(text)

    before = per_worker()
    conns = [connect(server) for _ in range(32)]
    body = json.dumps(REVIEW).encode()
    # Each one connects and asks at once (a gthread worker's thread waits for a new connection's
    # first request), then all 32 stay open and ask again, as kube-apiserver's do.
    for _ in range(3):
        for conn in conns:
            assert post(conn, "/mutate-restore", body)[0] == 200
    for conn in conns:
        conn.close()
    after = per_worker()
    served = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    assert len(served) == 2 and sum(served.values()) == 96, served
    assert all(n > 0 for n in served.values()), served


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{oops", 400, b"not JSON"),
        (b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}', 400, b"no request"),
    ],
)
def test_bad_requests_get_a_reason(server: Running, body: bytes, status: int, needle: bytes) -> None:
    conn = connect(server)
    got, answer = post(conn, "/mutate-restore", body)
    assert got == status and needle in answer
    conn.close()


def test_body_over_the_limit_is_refused_before_it_is_read(server: Running) -> None:
    conn = connect(server)
    conn.putrequest("POST", "/mutate-restore")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    conn.send(b"{")  # the server answers from the declared length, without waiting for the body
    resp = conn.getresponse()
    assert resp.status == 413 and b"larger than the limit" in resp.read()
    conn.close()


def test_health_and_metrics_sum_over_workers(server: Running) -> None:
    conn = connect(server)
    for path in ("/healthz", "/readyz"):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"ok\n"
    conn.close()
    body = json.dumps(REVIEW).encode()
    for _ in range(20):  # fresh connections, so both workers take some
        c = connect(server)
        assert post(c, "/mutate-restore", body)[0] == 200
        c.close()
    conn = connect(server)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    line = next(
        ln
        for ln in text.splitlines()
        if ln.startswith('thaw_webhook_admissions_total{outcome="mutated",path="/mutate-restore"}')
    )
    assert float(line.split()[-1]) >= 20
    assert "thaw_webhook_admission_seconds_bucket" in text


def _serial(conn: http.client.HTTPSConnection) -> int:
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_certificate_rotation_without_restart_or_failed_request(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    with running_webhook(certs, workers=2) as run:
        body = json.dumps(REVIEW).encode()
        failures: list[str] = []
        served = [0]
        stop = threading.Event()

        def hammer() -> None:
            # Alternates kept-alive and fresh connections through the rotation.
            while not stop.is_set():
                conn = connect(run)
                try:
                    for _ in range(5):
                        status, _ = post(conn, "/mutate-restore", body)
                        if status != 200:
                            failures.append(f"HTTP {status}")
                        served[0] += 1
                except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                    failures.append(repr(exc))
                finally:
                    conn.close()

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            first = connect(run)
            first.connect()
            old = _serial(first)
            first.close()
            write_cert_dir(certs, ["localhost"], ["127.0.0.1"])  # same CA, new serving certificate
            deadline = time.monotonic() + 15
            new = old
            while new == old and time.monotonic() < deadline:
                time.sleep(0.2)
                c = connect(run)
                c.connect()  # verified against the unchanged CA
                new = _serial(c)
                c.close()
            assert new != old, "the rotated certificate was not served within 15 s"
            # Past the reload check interval, no worker may still hand out the old certificate.
            time.sleep(ReloadingContext.CHECK_INTERVAL_S + 0.2)
            seen = set()
            for _ in range(20):
                c = connect(run)
                c.connect()
                seen.add(_serial(c))
                c.close()
            assert seen == {new}
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=20)
        assert failures == [] and served[0] > 20
        assert run.process.poll() is None  # still the same server process


def test_bad_config_stops_before_serving(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "c.yaml").write_text("imagePullPolicy: Sometimes\n")
    certs = make_certs(tmp_path / "certs")
    cmd = [
        sys.executable,
        "-m",
        "thaw",
        "webhook",
        "--cert-dir",
        str(certs),
        "--config",
        str(tmp_path / "c.yaml"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "imagePullPolicy='Sometimes'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
