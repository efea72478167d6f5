"""`thaw extender --nodes FILE` as a subprocess: real gunicorn, real HTTP and HTTPS."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from extender.launch import extender_command
from extender.synthetic import cluster
from tests.conftest import load_fixture
from tests.extender.conftest import annotate, fixture_nodes
from thaw.serve.serving import free_port
from thaw.serve.tls import generate


def start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    nodes = tmp_path / "nodes.json"
    doc = cluster(20)
    doc["items"] += fixture_nodes()
    nodes.write_text(json.dumps(doc))
    port = free_port()
    proc = subprocess.Popen(
        extender_command(port, nodes, *extra, log_level="info"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, port


def get(url: str, ctx: ssl.SSLContext | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(base: str, proc: subprocess.Popen[bytes], ctx: ssl.SSLContext | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if get(base + "/readyz", ctx)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, ssl.SSLError):
            pass
        time.sleep(0.1)
    raise AssertionError("extender did not become ready")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    proc, port = start(tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_filter_prioritize_health_metrics_through_gunicorn(served: str) -> None:
    assert get(served + "/healthz") == (200, b"ok\n")
    assert get(served + "/readyz")[1].startswith(b"ok: 24 nodes")
    args = annotate(load_fixture("raw/extender-filter-ncc-true-1.json"), "required")
    status, body = get(served + "/filter", data=json.dumps(args).encode())
    out = json.loads(body)
    assert (
        status == 200 and out["NodeNames"] == ["node-1", "node-2"] and set(out["FailedNodes"]) == {"node-3"}
    )
    args = annotate(load_fixture("raw/extender-prioritize-ncc-false-2.json"))
    status, body = get(served + "/prioritize", data=json.dumps(args).encode())
    assert status == 200 and [h["Host"] for h in json.loads(body)] == ["node-1", "node-2"]
    assert get(served + "/filter", data=b"{nope")[0] == 400
    status, metrics = get(served + "/metrics")
    assert status == 200
    assert b'thaw_extender_requests_total{code="200",verb="filter"} 1.0' in metrics
    assert b'thaw_extender_requests_total{code="400",verb="filter"} 1.0' in metrics
    assert b"thaw_extender_nodes 24.0" in metrics


def test_https_with_cert_dir(tmp_path: Path) -> None:
    gen, _, _ = generate(["localhost"], ips=["127.0.0.1"])
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "tls.crt").write_bytes(gen.cert_pem)
    (certs / "tls.key").write_bytes(gen.key_pem)
    (certs / "ca.crt").write_bytes(gen.ca_pem)
    proc, port = start(tmp_path, "--cert-dir", str(certs))
    ctx = ssl.create_default_context(cadata=gen.ca_pem.decode())
    try:
        wait_ready(f"https://127.0.0.1:{port}", proc, ctx)
        args = annotate(load_fixture("raw/extender-prioritize-ncc-true-2.json"))
        status, body = get(f"https://127.0.0.1:{port}/prioritize", ctx, json.dumps(args).encode())
        assert status == 200 and json.loads(body)[0]["Score"] > json.loads(body)[1]["Score"]
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_bad_nodes_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "nodes.yaml"
    bad.write_text("kind: NodeList\nitems: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "thaw", "extender", "--nodes", str(bad)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "expected a NodeList" in r.stderr


def test_chunked_and_kept_alive_bodies_are_read_whole(served: str) -> None:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(served)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    args = annotate(load_fixture("raw/extender-filter-ncc-false-1.json"), "required")
    body = json.dumps(args).encode()
    pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    for chunked in (True, False, True):  # one connection: each body must be consumed exactly
        conn.request(
            "POST",
            "/filter",
            body=iter(pieces) if chunked else body,
            headers={"Content-Type": "application/json"},
            encode_chunked=chunked,
        )
        resp = conn.getresponse()
        out = json.loads(resp.read())
        assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
        assert [n["metadata"]["name"] for n in out["Nodes"]["items"]] == ["node-1", "node-2"]
    conn.request("GET", "/filter")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 405  # the verbs are POST only
    conn.close()
