"""``thaw certs``: a CA and a serving certificate for the webhook or the extender."""

from __future__ import annotations

import argparse
import sys

from thaw.errors import UsageError
from thaw.serve.tls import write_cert_dir


def run(args: argparse.Namespace) -> int:
    if args.auto:
        from thaw.serve.certctl import SERVING_DAYS, run_auto

        if args.days is None:
            args.days = SERVING_DAYS
        return run_auto(args)
    if args.out is None:
        raise UsageError("give --out DIR for ca.crt, tls.crt and tls.key (or --auto for the controller)")
    if not args.dns and not args.ip:
        raise UsageError("give at least one --dns NAME or --ip IP for the certificate's SANs")
    gen = write_cert_dir(args.out, args.dns, args.ip, 365 if args.days is None else args.days)
    sys.stderr.write(f"wrote {args.out}/ca.crt, tls.crt, tls.key; caBundle on stdout\n")
    sys.stdout.write(gen.ca_bundle + "\n")
    return 0
