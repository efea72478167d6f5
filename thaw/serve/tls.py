"""TLS for the webhook and the extender: certificate generation and hot reloading.

``generate`` writes the layout cert-manager writes into a Secret (``ca.crt``, ``tls.crt``,
``tls.key``). ``ReloadingContext`` hands out one ``ssl.SSLContext`` per certificate generation:
each new TLS connection gets the current context, so a rotated certificate is served from the next
handshake on, without a restart, while connections already open finish on the old one.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from thaw.contract.safeio import write_atomic

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"


@dataclass(frozen=True)
class Generated:
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    @property
    def ca_bundle(self) -> str:
        """The base64 caBundle a MutatingWebhookConfiguration or extender tlsConfig takes."""
        return base64.b64encode(self.ca_pem).decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate(  # noqa: PLR0917
    dns_names: list[str],
    ips: list[str] | None = None,
    days: int = 365,
    ca_key: ec.EllipticCurvePrivateKey | None = None,
    ca_cert: x509.Certificate | None = None,
    ca_days: int | None = None,
) -> tuple[Generated, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A serving certificate for ``dns_names``/``ips``, signed by the given CA or a new one.

    A new CA is valid ``ca_days`` (default ten times ``days``).
    """
    if not dns_names and not ips:
        raise ValueError("a serving certificate needs at least one DNS name or IP address")
    now = dt.datetime.now(dt.UTC)
    if ca_key is None or ca_cert is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("thaw-ca"))
            .issuer_name(_name("thaw-ca"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=ca_days if ca_days is not None else days * 10))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_names[0] if dns_names else str(ips[0] if ips else "thaw")))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Generated(ca_cert.public_bytes(pem), cert.public_bytes(pem), _pem_key(key)), ca_key, ca_cert


def write_cert_dir(
    out: Path, dns_names: list[str], ips: list[str] | None = None, days: int = 365
) -> Generated:
    """Write ``ca.crt``, ``ca.key``, ``tls.crt``, ``tls.key`` into ``out``, reusing a CA found there.

    Reusing the CA keeps the caBundle that kube-apiserver trusts valid across serving-cert rotations.
    The key is written before the certificate so a reader that sees the new certificate also finds
    its key.
    """
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ca_cert = None
    if (out / CA_KEY_FILE).exists() and (out / CA_FILE).exists():
        loaded = serialization.load_pem_private_key((out / CA_KEY_FILE).read_bytes(), password=None)
        if isinstance(loaded, ec.EllipticCurvePrivateKey):
            ca_key = loaded
            ca_cert = x509.load_pem_x509_certificate((out / CA_FILE).read_bytes())
    gen, new_ca_key, _ = generate(dns_names, ips, days, ca_key, ca_cert)
    write_atomic(out / CA_KEY_FILE, _pem_key(new_ca_key), mode=0o600, fsync=True)
    write_atomic(out / CA_FILE, gen.ca_pem, mode=0o644, fsync=True)
    write_atomic(out / KEY_FILE, gen.key_pem, mode=0o600, fsync=True)
    write_atomic(out / CERT_FILE, gen.cert_pem, mode=0o644, fsync=True)
    return gen


class ReloadingContext:
    """Serves the newest valid certificate in ``cert_dir``; checks the files at most once a second.

    A rotation caught half-written (a certificate whose key does not match yet) keeps the previous
    context and is retried on the next check, so no handshake ever fails because of a rotation.
    """

    CHECK_INTERVAL_S = 1.0

    def __init__(self, cert_dir: Path) -> None:
        self.cert_file = cert_dir / CERT_FILE
        self.key_file = cert_dir / KEY_FILE
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._checked = 0.0
        self._context = self._load()  # fail loudly at start: no certificate, no server

    def _file_stamp(self) -> tuple[int, int, int, int]:
        c, k = os.stat(self.cert_file), os.stat(self.key_file)
        return (c.st_mtime_ns, c.st_ino, k.st_mtime_ns, k.st_ino)

    def _load(self) -> ssl.SSLContext:
        stamp = self._file_stamp()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(certfile=str(self.cert_file), keyfile=str(self.key_file))
        self._stamp = stamp
        return ctx

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked < self.CHECK_INTERVAL_S:
            return self._context
        with self._lock:
            if now - self._checked < self.CHECK_INTERVAL_S:
                return self._context
            self._checked = now
            try:
                if self._file_stamp() != self._stamp:
                    self._context = self._load()
                    log.info("tls: loaded rotated certificate from %s", self.cert_file)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("tls: keeping the previous certificate, the new one is not usable yet: %s", exc)
        return self._context
