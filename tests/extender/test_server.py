"""`thaw extender --nodes FILE` as a subprocess: real gunicorn, real HTTP and HTTPS."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extender.launch import extender_command
from extender.synthetic import cached, cluster, node
from tests.conftest import load_fixture
from tests.extender.conftest import SIZE, SNAPSHOT, annotate, fixture_nodes
from thaw.dev.sandbox import thaw_cli
from thaw.serve.serving import free_port
from thaw.serve.tls import generate


def start(
    tmp_path: Path, *extra: str, doc: dict[str, Any] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    nodes = tmp_path / "nodes.json"
    if doc is None:
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
    r = thaw_cli("extender", "--nodes", bad)
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


def worker_rss_mib(master: int) -> float:
    """Resident memory of the gunicorn worker under ``master`` (the extender's one worker)."""
    [child] = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    for line in Path(f"/proc/{child}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {child}")


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = int(next(h.split(":", 1)[1] for h in lines if h.lower().startswith("content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return int(lines[0].split()[1]), body[:length]


@pytest.fixture
def served_proc(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    proc, port = start(tmp_path)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}", port, proc.pid
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_a_body_over_the_limit_is_refused_unread(served_proc: tuple[str, int, int]) -> None:
    from extender.app import MAX_BODY_BYTES

    base, port, master = served_proc
    rss = worker_rss_mib(master)
    # Declared 300 MB, 1 MiB sent: answered at once from the headers, nothing more read.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /prioritize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n{" % (300 * 2**20)
        )
        s.sendall(b" " * 2**20)
        status, body = read_response(s)
    assert status == 413
    error = json.loads(body)["Error"]
    assert f"larger than the extender's limit of {MAX_BODY_BYTES} bytes" in error
    assert "Content-Length 314572800" in error and "nodeCacheCapable: true" in error
    # Chunked, just over the limit: read up to limit + 1 bytes, then refused in filter's shape.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    piece = b" " * 2**20
    pieces = [b"{", *([piece] * (MAX_BODY_BYTES // len(piece))), b"}"]
    conn.request("POST", "/filter", body=iter(pieces), encode_chunked=True)
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and out["FailedNodes"] == {} and "a chunked body" in out["Error"]
    assert worker_rss_mib(master) < rss + 32  # the refused bodies are not kept
    assert get(base + "/healthz") == (200, b"ok\n")
    metrics = get(base + "/metrics")[1]
    assert b'thaw_extender_requests_total{code="413",verb="prioritize"} 1.0' in metrics
    assert b'thaw_extender_requests_total{code="413",verb="filter"} 1.0' in metrics


def test_the_next_pod_sees_the_one_placed_before_it(tmp_path: Path) -> None:
    """Through gunicorn: a prioritize answer's placement is noted once the answer is sent (the
    response's close()), and the next request waits for it: the next pod's answer counts it."""
    items = [
        node("gpu-a", snapshots=[cached(SNAPSHOT, SIZE, "memory")]),
        node("gpu-b", snapshots=[cached(SNAPSHOT, SIZE, "disk")]),
    ]
    proc, port = start(tmp_path, doc={"kind": "NodeList", "metadata": {}, "items": items})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        args = annotate(load_fixture("raw/extender-prioritize-ncc-true-2.json"))
        args["NodeNames"] = ["gpu-a", "gpu-b"]
        answers = []
        for uid in ("pod-a", "pod-b"):
            args["Pod"]["metadata"]["uid"] = uid
            status, body = get(base + "/prioritize", data=json.dumps(args).encode())
            assert status == 200
            answers.append({h["Host"]: h["Score"] for h in json.loads(body)})
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert answers[0]["gpu-a"] > answers[0]["gpu-b"]  # page cache beats disk: pod-a to gpu-a
    # pod-a counted there: gpu-a's answer drops, gpu-b's stays
    assert answers[1]["gpu-a"] < answers[0]["gpu-a"] and answers[1]["gpu-b"] == answers[0]["gpu-b"]
