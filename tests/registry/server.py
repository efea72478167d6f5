"""A real OCI registry for the tests: Debian's ``docker-registry`` (the CNCF distribution server) over
TLS with a CA from ``thaw certs``, with htpasswd (Basic) or token (Bearer) auth; a token server for
the latter; and a TCP proxy that cuts connections after N bytes (a connection broken halfway)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from thaw.dev.sandbox import thaw_cli

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
USER, PASSWORD = "alice", "s3cret-pass"
SERVICE, ISSUER = "thaw-test-registry", "thaw-test-issuer"


def missing_tools() -> str | None:
    if not Path(REGISTRY_BIN).exists():
        return "docker-registry (Debian package docker-registry) is not installed: scripts/ensure-tools"
    if not shutil.which("htpasswd"):
        return "htpasswd (Debian package apache2-utils) is not installed: scripts/ensure-tools"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def docker_config(path: Path, entries: dict[str, tuple[str, str]]) -> Path:
    """A Docker config.json with ``auths`` for each HOST:PORT -> (user, password)."""
    auths = {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for h, (u, p) in entries.items()}
    path.write_text(json.dumps({"auths": auths}))
    return path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The registry's token server (distribution's token auth): checks Basic credentials, answers a
    JWT (ES256, ``x5c`` chained to the CA the registry trusts) granting what the scope asks."""

    def __init__(self, key_pem: bytes, cert_pem: bytes) -> None:
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.cert_der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        self.port = free_port()
        self.issued = 0
        self.refused = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if auth != want:
                    server.refused += 1
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps(
                    {"token": server.token(q.get("scope", [""])[0]), "expires_in": 300}
                ).encode()
                server.issued += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token(self, scope: str) -> str:
        access = []
        for one in scope.split(" "):
            parts = one.split(":")
            if len(parts) == 3:
                access.append({"type": parts[0], "name": parts[1], "actions": parts[2].split(",")})
        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {
            "iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": uuid.uuid4().hex, "access": access,
        }  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Registry:
    """One distribution server under ``root``: ``start``/``stop`` at will (a stopped registry), its
    blobs on disk (``blob_path``, to tamper with one), clients' files (``auth_file``, ``ca``)."""

    root: Path
    auth: str = "htpasswd"  # or "token"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    tokens: TokenServer | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    def store(self, repository: str = "thaw/snapshots", host: str | None = None) -> str:
        return f"oci://{host or self.host}/{repository}"

    def auth_file(
        self, name: str = "auth.json", password: str = PASSWORD, hosts: list[str] | None = None
    ) -> Path:
        return docker_config(self.root / name, {h: (USER, password) for h in (hosts or [self.host])})

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return (
            self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"
        )

    def setup(self) -> None:
        certs = self.root / "certs"
        out = thaw_cli("certs", "--out", certs, "--dns", "localhost", "--ip", "127.0.0.1")
        assert out.returncode == 0, out.stderr
        htpasswd = subprocess.run(
            ["htpasswd", "-Bbn", USER, PASSWORD], capture_output=True, check=True, text=True
        ).stdout
        (self.root / "htpasswd").write_text(htpasswd)
        if self.auth == "token":
            self.tokens = TokenServer((certs / "tls.key").read_bytes(), (certs / "tls.crt").read_bytes())
            auth = (
                f"  token:\n    realm: {self.tokens.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {certs / 'ca.crt'}\n"
            )
        else:
            auth = f"  htpasswd:\n    realm: thaw-test\n    path: {self.root / 'htpasswd'}\n"
        (self.root / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n  tls:\n    certificate: {certs / 'tls.crt'}\n"
            f"    key: {certs / 'tls.key'}\nauth:\n{auth}"
        )

    def start(self) -> None:
        assert self.proc is None
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115  (the child owns it)
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.root / "config.yml")], stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        log.close()
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self.tokens is not None:
            self.tokens.close()


@contextlib.contextmanager
def running_registry(root: Path, auth: str = "htpasswd") -> Iterator[Registry]:
    root.mkdir(parents=True, exist_ok=True)
    reg = Registry(root, auth)
    reg.setup()
    reg.start()
    try:
        yield reg
    finally:
        reg.close()


class CuttingProxy:
    """A TCP proxy to ``target_port`` that, once ``cut_after`` bytes went back to clients in all,
    drops every open connection mid-stream (no TLS close, no FIN of HTTP: a broken connection); with
    ``refuse_after_cut`` it also closes every later connection at once (the registry stays gone)."""

    def __init__(self, target_port: int, cut_after: int, refuse_after_cut: bool = False) -> None:
        self.target_port, self.cut_after, self.refuse = target_port, cut_after, refuse_after_cut
        self.sent = 0
        self.cuts = 0
        self.cut = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[socket.socket] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port: int = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse and self.cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        room = self.cut_after - self.sent if not self.cut.is_set() else len(data)
                        self.sent += len(data)
                    if room < len(data):
                        dst.sendall(data[: max(0, room)])
                        self._cut_all()
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _cut_all(self) -> None:
        with self.lock:
            if self.cut.is_set():
                return
            self.cut.set()
            self.cuts += 1
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                # RST, not FIN: the client sees a connection reset mid-body.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
