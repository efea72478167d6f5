"""``thaw certs --auto``: Thaw's own CA and serving certificate, created, rotated and trusted.

The no-dependency certificate path (manifests/overlays/default), as vault-k8s does with
``-tls-auto``. One small controller (Deployment thaw-certs) keeps, in its namespace:

- Secret ``thaw-ca`` (``ca.crt``, ``ca.key``, and ``previous.crt`` while an older CA is still
  trusted): read by nothing but this controller;
- Secret ``thaw-tls`` (``ca.crt``, ``tls.crt``, ``tls.key``, type kubernetes.io/tls): the serving
  certificate of the webhook and extender Services, mounted by their pods (which serve a renewed
  certificate from the next TLS handshake on) and, for ``ca.crt``, by the second scheduler;
- the ``caBundle`` of every entry of the named MutatingWebhookConfiguration.

Each reconcile decides from what it reads (:func:`plan`, pure) and writes only what differs. The
order keeps every TLS handshake valid through a rotation: the caBundle is widened to the new CA
*before* a certificate signed by it is served, and an old CA stays in the bundle until it expires.
Concurrent writers (two replicas, a human) are handled with resourceVersion conflicts: on 409 the
controller reads again and re-plans.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from thaw.contract.safeio import write_atomic
from thaw.serve.tls import CA_FILE, CERT_FILE, KEY_FILE, generate

log = logging.getLogger("thaw.certs")

CA_KEY = "ca.key"
PREVIOUS_CA = "previous.crt"
# A new serving certificate is valid SERVING_DAYS and renewed when fewer than RENEW_BEFORE_DAYS
# remain (a third of its life: ample time for kubelet to propagate the Secret, and for an operator
# to notice a controller that has been failing for weeks). The CA lives CA_DAYS and is replaced
# once it would expire before a serving certificate issued now.
SERVING_DAYS = 90
RENEW_BEFORE_DAYS = 30
CA_DAYS = 3650
MAX_CONFLICT_RETRIES = 5


@dataclass(frozen=True)
class Settings:
    namespace: str
    dns_names: tuple[str, ...]
    ca_secret: str = "thaw-ca"
    tls_secret: str = "thaw-tls"
    webhook_config: str | None = "thaw-webhook"
    serving_days: int = SERVING_DAYS
    renew_before_days: int = RENEW_BEFORE_DAYS
    ca_days: int = CA_DAYS


@dataclass(frozen=True)
class CaState:
    cert_pem: bytes
    key_pem: bytes
    previous_pem: bytes | None  # an older CA still trusted until it expires


@dataclass(frozen=True)
class Plan:
    new_ca: bool  # make a new CA (none yet, or the current one expires too soon)
    new_serving: bool  # issue a new serving certificate
    reason: str  # why, for the log; "" when nothing changes


def _load_cert(pem: bytes | None) -> x509.Certificate | None:
    if not pem:
        return None
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None


def _sans(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return set()
    return set(ext.value.get_values_for_type(x509.DNSName))


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def plan(  # noqa: PLR0917
    settings: Settings,
    ca_pem: bytes | None,
    ca_key_pem: bytes | None,
    serving_pem: bytes | None,
    serving_key_pem: bytes | None,
    now: dt.datetime,
) -> Plan:
    """What this reconcile must change, from what the Secrets hold now. Pure."""
    renew = dt.timedelta(days=settings.renew_before_days)
    ca = _load_cert(ca_pem)
    if ca is None or not ca_key_pem:
        return Plan(True, True, "no CA yet")
    if ca.not_valid_after_utc - now < dt.timedelta(days=settings.serving_days) + renew:
        return Plan(
            True,
            True,
            f"CA expires {ca.not_valid_after_utc:%Y-%m-%d}, before a new serving certificate would",
        )
    cert = _load_cert(serving_pem)
    if cert is None or not serving_key_pem:
        return Plan(False, True, "no serving certificate yet")
    if not _signed_by(cert, ca):
        return Plan(False, True, "serving certificate is not signed by the current CA")
    if _sans(cert) != set(settings.dns_names):
        return Plan(
            False, True, f"serving certificate names {sorted(_sans(cert))}, want {sorted(settings.dns_names)}"
        )
    if cert.not_valid_after_utc - now < renew:
        return Plan(False, True, f"serving certificate expires {cert.not_valid_after_utc:%Y-%m-%d}")
    return Plan(False, False, "")


def bundle(ca_pem: bytes, previous_pem: bytes | None, now: dt.datetime) -> bytes:
    """The PEM bundle clients trust: the current CA, plus the previous one while it is still valid."""
    prev = _load_cert(previous_pem)
    if prev is not None and prev.not_valid_after_utc > now:
        return ca_pem.rstrip(b"\n") + b"\n" + (previous_pem or b"").lstrip(b"\n")
    return ca_pem


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(data: Mapping[str, str] | None, key: str) -> bytes | None:
    if not data or key not in data or data[key] is None:
        return None
    return base64.b64decode(data[key])


class CertController:
    """Reconciles the two Secrets and the webhook configuration's caBundle through the Kubernetes API."""

    def __init__(self, settings: Settings, api_client: Any, out_dir: Path | None = None) -> None:
        from kubernetes import client

        self.s = settings
        self.core = client.CoreV1Api(api_client)
        self.admission = client.AdmissionregistrationV1Api(api_client)
        self.out_dir = out_dir

    # --- Secrets ---------------------------------------------------------------------------------

    def _read_secret(self, name: str) -> tuple[dict[str, str] | None, str | None]:
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self._raw(
                self.core.read_namespaced_secret(name, self.s.namespace, _preload_content=False)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None, None
            raise
        return dict(secret.get("data") or {}), secret["metadata"]["resourceVersion"]

    @staticmethod
    def _raw(response: Any) -> dict[str, Any]:
        # Objects are read as the JSON kube-apiserver sent, not through the client's models: a
        # model drops fields it does not know, and its bytes fields differ between client versions.
        value: dict[str, Any] = json.loads(response.data)
        return value

    def _write_secret(
        self, name: str, data: dict[str, bytes], secret_type: str, resource_version: str | None
    ) -> None:
        """Create the Secret, or replace it at ``resource_version`` (409 if someone wrote first)."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": self.s.namespace,
                "labels": {"app.kubernetes.io/part-of": "thaw", "app.kubernetes.io/managed-by": "thaw-certs"},
            },
            "type": secret_type,
            "data": {k: _b64(v) for k, v in data.items()},
        }
        core: Any = self.core  # a plain dict body: accepted by every client version
        if resource_version is None:
            core.create_namespaced_secret(self.s.namespace, body)
        else:
            body["metadata"]["resourceVersion"] = resource_version
            core.replace_namespaced_secret(name, self.s.namespace, body)

    # --- caBundle --------------------------------------------------------------------------------

    def _sync_ca_bundle(self, ca_bundle: bytes) -> bool:
        """Set caBundle on every webhook of the configuration; True when it had to change."""
        if not self.s.webhook_config:
            return False
        config = self._raw(
            self.admission.read_mutating_webhook_configuration(self.s.webhook_config, _preload_content=False)
        )
        want = _b64(ca_bundle)
        ops: list[dict[str, Any]] = []
        for i, hook in enumerate(config.get("webhooks") or []):
            if hook.get("clientConfig", {}).get("caBundle") == want:
                continue
            # "test" pins the entry by name, so a concurrent reorder fails the patch (422, read
            # again) instead of writing into another entry.
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
        if not ops:
            return False
        self.admission.patch_mutating_webhook_configuration(self.s.webhook_config, ops)
        log.info("caBundle of MutatingWebhookConfiguration %s updated", self.s.webhook_config)
        return True

    # --- one pass --------------------------------------------------------------------------------

    def reconcile(self, now: dt.datetime | None = None) -> Plan:
        """One pass; retried from a fresh read when another writer got there first (409)."""
        from kubernetes.client.exceptions import ApiException

        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                return self._reconcile_once(now or dt.datetime.now(dt.UTC))
            except ApiException as exc:
                if exc.status not in (409, 422) or attempt == MAX_CONFLICT_RETRIES - 1:
                    raise
                log.info("certificate objects changed under us (%s); reading them again", exc.status)
        raise AssertionError("unreachable")

    def _reconcile_once(self, now: dt.datetime) -> Plan:
        ca_data, ca_rv = self._read_secret(self.s.ca_secret)
        tls_data, tls_rv = self._read_secret(self.s.tls_secret)
        ca_pem, ca_key_pem = _unb64(ca_data, CA_FILE), _unb64(ca_data, CA_KEY)
        previous_pem = _unb64(ca_data, PREVIOUS_CA)
        serving_pem, serving_key_pem = _unb64(tls_data, CERT_FILE), _unb64(tls_data, KEY_FILE)

        p = plan(self.s, ca_pem, ca_key_pem, serving_pem, serving_key_pem, now)
        if p.new_ca:
            old_ca = _load_cert(ca_pem)
            previous_pem = ca_pem if old_ca is not None and old_ca.not_valid_after_utc > now else None
            gen, key, _ = generate(list(self.s.dns_names), days=self.s.serving_days, ca_days=self.s.ca_days)
            ca_pem = gen.ca_pem
            ca_key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            ca_out = {CA_FILE: ca_pem, CA_KEY: ca_key_pem}
            if previous_pem:
                ca_out[PREVIOUS_CA] = previous_pem
            self._write_secret(self.s.ca_secret, ca_out, "Opaque", ca_rv)
            log.info("new CA (%s)", p.reason)
        assert ca_pem is not None and ca_key_pem is not None
        trusted = bundle(ca_pem, previous_pem, now)

        # Trust first, then serve: the caBundle holds the new CA before any certificate it signed.
        self._sync_ca_bundle(trusted)

        if p.new_serving:
            ca_cert = x509.load_pem_x509_certificate(ca_pem)
            ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
            if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"Secret {self.s.ca_secret}: ca.key is not an EC private key")
            gen, _, _ = generate(
                list(self.s.dns_names), days=self.s.serving_days, ca_key=ca_key, ca_cert=ca_cert
            )
            serving_pem, serving_key_pem = gen.cert_pem, gen.key_pem
            log.info("new serving certificate for %s (%s)", ", ".join(self.s.dns_names), p.reason)
        assert serving_pem is not None and serving_key_pem is not None
        want = {CA_FILE: trusted, CERT_FILE: serving_pem, KEY_FILE: serving_key_pem}
        if {k: _unb64(tls_data, k) for k in want} != want:
            self._write_secret(self.s.tls_secret, want, "kubernetes.io/tls", tls_rv)
        if self.out_dir is not None:
            self._write_files(want)
        return p

    def _write_files(self, files: Mapping[str, bytes]) -> None:
        """Mirror thaw-tls into a directory (a server in the same pod, or `--once` for scripts)."""
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Key before certificate: a reader that sees the new certificate also finds its key.
        for name in (KEY_FILE, CA_FILE, CERT_FILE):
            path = self.out_dir / name
            if not path.exists() or path.read_bytes() != files[name]:
                write_atomic(path, files[name], mode=0o600 if name == KEY_FILE else 0o644, fsync=True)


class Health:
    """Liveness for the controller: healthy while reconciles keep succeeding."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_ok: float | None = None

    def ok(self) -> None:
        self.last_ok = self.clock()

    def ready(self) -> bool:
        return self.last_ok is not None

    def live(self) -> bool:
        # Three missed reconciles (or none at all for three intervals after start) is unhealthy:
        # a restart retries from scratch with a fresh API connection.
        since = self.last_ok if self.last_ok is not None else self.started
        return self.clock() - since < 3 * self.interval_s + 30


def serve_health(health: Health, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = {"/healthz": health.live, "/readyz": health.ready}.get(self.path)
            code = 404 if status is None else (200 if status() else 503)
            body = {200: b"ok\n", 503: b"not ok\n", 404: b"not found\n"}[code]
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, name="thaw-certs-health", daemon=True).start()
    return server


def _api_client(kubeconfig: str | None) -> Any:
    from kubernetes import client
    from kubernetes import config as kconfig

    config: Any = kconfig  # untyped module functions

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def run_auto(args: argparse.Namespace) -> int:
    from thaw.errors import UsageError

    if not args.dns:
        raise UsageError(
            "--auto needs at least one --dns NAME (the Services' names, e.g. thaw-webhook.thaw-system.svc)"
        )
    if args.ip:
        raise UsageError("--auto issues DNS names only (Services are reached by name); drop --ip")
    if args.renew_before_days >= args.days:
        raise UsageError(f"--renew-before-days {args.renew_before_days} must be less than --days {args.days}")
    settings = Settings(
        namespace=args.namespace,
        dns_names=tuple(args.dns),
        ca_secret=args.ca_secret,
        tls_secret=args.secret,
        webhook_config=args.webhook_config or None,
        serving_days=args.days,
        renew_before_days=args.renew_before_days,
    )
    controller = CertController(settings, _api_client(args.kubeconfig), args.out)
    if args.once:
        result = controller.reconcile()
        log.info("certificates reconciled: %s", result.reason or "nothing to change")
        return 0
    health = Health(args.interval)
    serve_health(health, args.health_port)
    while True:
        try:
            result = controller.reconcile()
            health.ok()
            if result.reason:
                log.info("certificates reconciled: %s", result.reason)
        except Exception as exc:
            log.warning("certificate reconcile failed, retrying in %ss: %s", args.interval, exc)
        time.sleep(args.interval)
