"""``thaw webhook``: check the configuration, then serve ``webhook.app`` under gunicorn over HTTPS."""

from __future__ import annotations

import argparse
import os

from thaw.errors import UsageError
from thaw.serve.serving import ServeOptions, serve

# Not webhook.app: prometheus_client must be imported only after thaw.serve.serving has chosen the
# multiprocess metrics directory, that is in the workers.
from webhook.config import CONFIG_ENV, ConfigError, load_config


def run(args: argparse.Namespace) -> int:
    if args.cert_dir is None:
        raise UsageError("--cert-dir is required: the webhook serves HTTPS only (kube-apiserver calls it)")
    if args.workers < 1 or args.threads < 1:
        raise UsageError(f"--workers {args.workers} and --threads {args.threads} must both be at least 1")
    try:
        load_config(args.config)  # fail here, once, rather than in every worker after the fork
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    else:
        os.environ.pop(CONFIG_ENV, None)
    opts = ServeOptions.from_args("webhook.app:create_app", args)
    # Each worker listens on its own SO_REUSEPORT socket (gunicorn >= 23 binds in the worker when
    # reuse_port is set), so the kernel spreads new connections over the workers by hash. With one
    # shared socket, whichever gthread worker is in accept() takes them, and with keep-alive all 32
    # of a client's connections could pile onto one worker for good: half the throughput (issue 15).
    opts.extra["reuse_port"] = True
    serve(opts)
    return 0
