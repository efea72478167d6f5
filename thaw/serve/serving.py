"""Run a Flask app the way both of Thaw's servers run: under gunicorn, started from the CLI.

One place for the serving choices the webhook and the extender share: gthread workers (keep-alive,
so kube-apiserver and kube-scheduler reuse TLS connections), a TLS context that follows certificate
rotation (``thaw.serve.tls.ReloadingContext``), Prometheus metrics that add up across worker processes,
and a ``post_worker_init`` hook for per-process start-up (the extender's node watch).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thaw.serve.tls import CERT_FILE, KEY_FILE, ReloadingContext

log = logging.getLogger(__name__)

_contexts: dict[str, ReloadingContext] = {}


def _reloading_ssl_context(conf: Any, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    # gunicorn asks for a context on every new connection; hand out the cached one for the
    # current certificate instead of re-reading the files each time.
    key = str(Path(conf.certfile).parent)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = ReloadingContext(Path(key))
    return ctx.current()


@dataclass
class ServeOptions:
    app: str  # "module:factory", imported in each worker after fork
    host: str
    port: int
    cert_dir: Path | None
    workers: int = 2
    threads: int = 4
    timeout_s: int = 30
    graceful_timeout_s: int = 10
    keepalive_s: int = 30
    post_worker_init: Callable[[], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, app: str, args: Any) -> ServeOptions:
        """The options every server command takes (--host, --port, --cert-dir, --workers, --threads)."""
        return cls(
            app=app,
            host=args.host,
            port=args.port,
            cert_dir=args.cert_dir,
            workers=args.workers,
            threads=args.threads,
        )


def prepare_metrics_dir(workers: int) -> Path | None:
    """Point prometheus_client at a shared directory when several processes serve.

    Must run before prometheus_client is imported anywhere, so the CLI calls it first.
    """
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = Path(tempfile.mkdtemp(prefix="thaw-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path


def metrics_payload() -> tuple[bytes, str]:
    """The Prometheus exposition of this server, summed over its worker processes, and the expiry
    of the certificate it serves."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry) + certificate_metrics(), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY) + certificate_metrics(), CONTENT_TYPE_LATEST


# The certificate file serve() serves (set before the workers fork, so each inherits it).
_served_cert: Path | None = None
CERT_EXPIRY_METRIC = "thaw_serving_certificate_expiry_timestamp_seconds"


def certificate_metrics(cert_file: Path | None = None) -> bytes:
    """``thaw_serving_certificate_expiry_timestamp_seconds``: when the served certificate expires
    (read at each scrape: a rotated certificate shows at once), for the near-expiry alert; nothing
    when the server serves plain HTTP or the file cannot be read."""
    from cryptography import x509
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    path = cert_file or _served_cert
    if path is None:
        return b""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return b""
    registry = CollectorRegistry()
    gauge = Gauge(CERT_EXPIRY_METRIC, "Unix time the served TLS certificate expires", registry=registry)
    gauge.set(cert.not_valid_after_utc.timestamp())
    return generate_latest(registry)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server started by a demo, benchmark or test."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def load_app(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)()


def serve(opts: ServeOptions) -> None:
    """Serve ``opts.app`` under gunicorn until SIGTERM/SIGINT (blocking)."""
    from gunicorn.app.base import BaseApplication

    if opts.cert_dir is not None:
        for name in (CERT_FILE, KEY_FILE):
            if not (opts.cert_dir / name).is_file():
                raise FileNotFoundError(
                    f"--cert-dir {opts.cert_dir} has no {name}: expected tls.crt and tls.key "
                    "(the layout of a kubernetes.io/tls Secret; `thaw certs --out DIR` makes one)"
                )
        ReloadingContext(opts.cert_dir)  # a broken certificate fails here, before forking workers
        global _served_cert
        _served_cert = opts.cert_dir / CERT_FILE
    metrics_dir = prepare_metrics_dir(opts.workers)

    def child_exit(_server: Any, worker: Any) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]

    def post_worker_init(_worker: Any) -> None:
        if opts.post_worker_init is not None:
            opts.post_worker_init()

    config: dict[str, Any] = {
        "bind": f"[{opts.host}]:{opts.port}" if ":" in opts.host else f"{opts.host}:{opts.port}",
        "workers": opts.workers,
        "worker_class": "gthread",
        "threads": opts.threads,
        "timeout": opts.timeout_s,
        "graceful_timeout": opts.graceful_timeout_s,
        "keepalive": opts.keepalive_s,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": os.environ.get("THAW_LOG_LEVEL", "info").lower(),
        "child_exit": child_exit,
        "post_worker_init": post_worker_init,
        **opts.extra,
    }
    if opts.cert_dir is not None:
        config |= {
            "certfile": str(opts.cert_dir / CERT_FILE),
            "keyfile": str(opts.cert_dir / KEY_FILE),
            "ssl_context": _reloading_ssl_context,
        }

    class Application(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in config.items():
                self.cfg.set(key, value)
            # gunicorn >= 25.1 opens a control socket at one fixed path ($HOME/.gunicorn/gunicorn.ctl)
            # for every server of the user: two Thaw servers on one host (webhook and extender,
            # parallel tests) would take it from each other, and a read-only root file system
            # fails. Thaw does not use gunicornc.
            if "control_socket_disable" in self.cfg.settings:
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            return load_app(opts.app)

    try:
        Application().run()
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
