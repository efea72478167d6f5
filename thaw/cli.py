"""The ``thaw`` command line (DESIGN.md, "Command line").

Every flag can also come from the environment as ``THAW_<FLAG>`` (upper case, dashes as
underscores): that is how the webhook configures the init containers and the wrapper. The command
line wins over the environment. Exit codes: 0 success, 2 usage error, 1 anything else, with one line
on stderr saying what and why.

Each command's work lives in the module named in ``COMMANDS``, imported only when that command
runs, so ``thaw exec`` in a workload container never pays for Flask or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from thaw.errors import UsageError

log = logging.getLogger("thaw")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, per the CLI contract, instead of argparse's usage block.
        sys.stderr.write(
            f"thaw {self.prog.partition(' ')[2] or ''}: {message} (see --help)\n".replace("  ", " ")
        )
        sys.exit(2)


def _env_name(flag: str) -> str:
    return "THAW_" + flag.lstrip("-").upper().replace("-", "_")


def _add(p: argparse.ArgumentParser, flag: str, *, required: bool = False, **kw: Any) -> None:
    """Add ``flag`` with its ``THAW_<FLAG>`` environment fallback."""
    env = os.environ.get(_env_name(flag))
    action = kw.get("action")
    if env is not None:
        if action == "append":
            kw["default"] = [v for v in env.split(",") if v]
        elif action == "store_true":
            kw["default"] = env.strip().lower() in ("1", "true", "yes", "on")
        else:
            kw["default"] = kw.get("type", str)(env)
        required = False
    kw["help"] = (kw.get("help") or "") + f" [env {_env_name(flag)}]"
    p.add_argument(flag, required=required, **kw)


def _store_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--store`` and the registry options (thaw/snapshot/stores.py: one factory for every caller)."""
    from pathlib import Path

    _add(
        p,
        "--store",
        required=required,
        default=None,
        help="snapshot store: a directory, file:///PATH, or oci://HOST[:PORT]/REPOSITORY",
    )
    _add(p, "--registry-auth", type=Path, default=None, help="Docker config.json (or its Secret's mount)")
    _add(p, "--registry-ca", type=Path, default=None, help="CA certificate trusted for the registry")
    _add(p, "--registry-plain-http", action="store_true", default=False, help="HTTP to a loopback registry")


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    parser = _Parser(prog="thaw", description="Restore GPU inference pods from snapshots.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("THAW_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity [env THAW_LOG_LEVEL]",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("webhook", help="serve the mutating admission webhook (HTTPS)")
    _add(p, "--host", default="0.0.0.0", help="address to listen on")
    _add(p, "--port", type=int, default=8443, help="port to listen on")
    _add(p, "--cert-dir", type=Path, required=True, help="directory with tls.crt and tls.key")
    _add(p, "--config", type=Path, default=None, help="webhook configuration file (YAML or JSON)")
    _add(p, "--workers", type=int, default=2, help="gunicorn worker processes")
    _add(p, "--threads", type=int, default=4, help="threads per worker")

    p = sub.add_parser("extender", help="serve the kube-scheduler extender")
    _add(p, "--host", default="0.0.0.0", help="address to listen on")
    _add(p, "--port", type=int, default=8444, help="port to listen on")
    _add(p, "--cert-dir", type=Path, default=None, help="directory with tls.crt and tls.key (HTTPS)")
    _add(
        p,
        "--nodes",
        type=Path,
        default=None,
        help="NodeList file (JSON or YAML) instead of watching the cluster",
    )
    _add(p, "--workers", type=int, default=1, help="gunicorn worker processes")
    _add(p, "--threads", type=int, default=8, help="threads per worker")
    _add(
        p,
        "--scoring",
        type=Path,
        default=None,
        help="YAML/JSON mapping overriding scoring constants (extender.scoring.Params fields)",
    )

    p = sub.add_parser("certs", help="generate a CA and a serving certificate; print the caBundle")
    _add(p, "--out", type=Path, default=None, help="directory for ca.crt, tls.crt, tls.key (unless --auto)")
    _add(p, "--dns", action="append", default=[], help="DNS name for the certificate (repeatable)")
    _add(p, "--ip", action="append", default=[], help="IP address for the certificate (repeatable)")
    _add(p, "--days", type=int, default=None, help="serving certificate validity (365; 90 --auto)")
    # --auto: keep a CA and serving certificate in Secrets and the webhook's caBundle current
    # (thaw/serve/certctl.py, manifests/overlays/default).
    _add(p, "--auto", action="store_true", help="run the certificate controller (Secrets, caBundle, renewal)")
    _add(p, "--once", action="store_true", help="with --auto: reconcile once and exit")
    _add(p, "--namespace", default="thaw-system", help="with --auto: namespace of the Secrets")
    _add(p, "--secret", default="thaw-tls", help="with --auto: Secret for ca.crt, tls.crt, tls.key")
    _add(p, "--ca-secret", default="thaw-ca", help="with --auto: Secret for the CA and its key")
    _add(p, "--webhook-config", default="thaw-webhook", help="with --auto: its webhooks' caBundle")
    _add(p, "--renew-before-days", type=int, default=30, help="with --auto: renew when fewer days remain")
    _add(p, "--interval", type=float, default=300.0, help="with --auto: seconds between reconciles")
    _add(p, "--health-port", type=int, default=8080, help="with --auto: plain HTTP /healthz, /readyz")
    _add(p, "--kubeconfig", default=None, help="with --auto: kubeconfig (default: in-cluster, then ~/.kube)")

    keys = sub.add_parser("keys", help="snapshot signing keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    p = ksub.add_parser("generate", help="write signing.key and signing.pub (Ed25519)")
    _add(p, "--out", type=Path, required=True, help="directory for the key pair")

    p = sub.add_parser("publish", help="publish a snapshot's image files to the store, signed")
    _store_flags(p, required=True)
    _add(p, "--name", required=True, help="snapshot name")
    _add(p, "--workload", required=True, help="workload hash (thaw.dev/workload)")
    _add(p, "--images", type=Path, required=True, help="directory of image files")
    _add(p, "--namespace", default="default", help="the pods' namespace (snapshots are per namespace)")
    _add(p, "--cache", type=Path, default=None, help="node cache to ingest into (and keep the copy)")
    _add(p, "--key", type=Path, required=True, help="Ed25519 signing key")
    _add(p, "--facts", type=Path, default=None, help="node facts JSON instead of detecting them")

    p = sub.add_parser("fetch", help="stage a compatible snapshot in the node cache; write the plan")
    _store_flags(p, required=True)
    _add(p, "--cache", type=Path, required=True, help="node cache directory")
    _add(p, "--name", required=True, help="snapshot name")
    _add(p, "--workload", required=True, help="workload hash (thaw.dev/workload)")
    _add(p, "--trust", type=Path, required=True, help="directory of trusted public keys")
    _add(p, "--plan", type=Path, required=True, help="where to write the restore plan")
    _add(p, "--facts", type=Path, default=None, help="node facts JSON instead of detecting them")
    _add(
        p,
        "--allow-unsigned",
        action="store_true",
        default=False,
        help="accept unsigned snapshots, or ones signed by a key not in --trust (opt-out of signing)",
    )
    _add(p, "--budget", type=int, default=None, help="cache byte budget (default: the agent's)")
    _add(p, "--namespace", default="default", help="the pod's namespace (snapshots are per namespace)")
    _add(p, "--pod-uid", default=None, help="pin the staged snapshot for this pod until its thaw exec")
    _add(p, "--deadline", type=float, default=600.0, help="seconds for the whole fetch; then a cold plan")

    p = sub.add_parser("exec", help="restore the workload from the plan, or run it (and checkpoint)")
    _add(p, "--plan", type=Path, default=None, help="restore plan written by thaw fetch")
    _add(p, "--checkpoint", choices=["on-ready", "never"], default="never", help="take a snapshot")
    _add(p, "--ready", default=None, help="readiness probe: URL, tcp:PORT or file:PATH")
    _store_flags(p, required=False)
    _add(p, "--key", type=Path, default=None, help="Ed25519 signing key")
    _add(p, "--name", default=None, help="snapshot name")
    _add(p, "--workload", default=None, help="workload hash")
    _add(p, "--facts", type=Path, default=None, help="node facts JSON instead of detecting them")
    _add(
        p,
        "--cache",
        type=Path,
        default=None,
        help="node cache: keep the snapshot taken here; leave the outcome for the agent's Events",
    )
    _add(p, "--outcome", type=Path, default=None, help="outcome JSON (default: outcome.json in --work)")
    _add(
        p,
        "--work",
        type=Path,
        default=None,
        help="work directory (the pod's emptyDir): outcome, CRIU logs, ready file, dump/ "
        "(default: beside --outcome, else beside --plan)",
    )
    _add(
        p,
        "--ready-gate",
        choices=["file", "stopped"],
        default="stopped",
        help="a restored tree stays stopped until its GPU state is back, so none of its health checks "
        "answers before (stopped), or it runs at once (file); <work>/ready appears then either way",
    )
    _add(p, "--ready-timeout", type=float, default=1800.0, help="seconds to wait for --ready")
    _add(p, "--sleep", default=None, help="URL (or path on --ready's server) to POST before the checkpoint, "
         'or a JSON array of steps (URL, or {"url": ..., "body": {...}})')  # fmt: skip
    _add(p, "--wake", default=None, help="URL, path or JSON array of steps to POST after the checkpoint "
         "and after a restore")  # fmt: skip
    _add(p, "--pid-floor", type=int, default=4096, help="start the workload at or above this PID")
    _add(
        p,
        "--pod-files-limit",
        type=int,
        default=1 << 30,
        help="bytes of pod files (open files a new pod lacks) a snapshot may carry; more is refused",
    )
    _add(
        p,
        "--tcp-established",
        action="store_true",
        default=False,
        help="restore connections inside the tree (NCCL) instead of closing them",
    )
    _add(
        p,
        "--criu-stock",
        action="store_true",
        default=False,
        help="restore with stock CRIU even where the fast-restore build (criu-fast) is present",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")

    # Internal: CRIU's post-dump action script runs it (thaw/runtime/podfiles.py); its flags are given
    # by thaw exec on the command line, with no THAW_<FLAG> fallbacks (the workload's env).
    p = sub.add_parser("capture-pod-files", help="internal: thaw exec's CRIU post-dump action (pod files)")
    p.add_argument("--images", type=Path, required=True, help="the dump's image directory")
    p.add_argument("--since", type=float, required=True, help="when the container started (epoch seconds)")
    p.add_argument("--limit", type=int, required=True, help="bytes the pod files may take")
    p.add_argument("--reason", type=Path, required=True, help="file for the reason when refused or failed")
    p.add_argument("--root-pid", type=int, default=None, help="the tree's root (default: CRTOOLS_INIT_PID)")
    p.add_argument("--skip", action="append", default=[], help="a path not to copy (stdout/stderr files)")

    p = sub.add_parser(
        "install-runtime", help="thaw-tools: link the node's copy of the runtime (copied once)"
    )
    _add(p, "--bundle", type=Path, default=None, help="runtime bundle (default: the one this thaw runs from)")
    _add(
        p,
        "--runtime-dir",
        type=Path,
        default=Path("/var/lib/thaw/runtime"),
        help="the node's runtime copies, one per bundle id (hostPath)",
    )
    _add(p, "--link", type=Path, default=Path("/thaw/rt"), help="symlink to make (in the tools emptyDir)")
    _add(p, "--lock-timeout", type=float, default=300.0, help="seconds to wait for another pod's copy")

    p = sub.add_parser("sidecar", help="thaw-sidecar: relay the outcome; publish the pod's dump once")
    _add(
        p,
        "--work",
        type=Path,
        default=Path("/run/thaw/work"),
        help="the pod's work emptyDir (shared with thaw exec)",
    )
    _add(
        p, "--plan", type=Path, default=Path("/run/thaw/plan/plan.json"), help="the restore plan (read-only)"
    )
    _add(p, "--cache", type=Path, default=Path("/var/lib/thaw/cache"), help="node cache directory")
    _store_flags(p, required=False)
    _add(p, "--key", type=Path, default=None, help="Ed25519 signing key: without one nothing is published")
    _add(
        p,
        "--state",
        type=Path,
        default=Path("/run/thaw/state"),
        help="the sidecar's own emptyDir (publish once per pod)",
    )
    _add(p, "--name", default=None, help="snapshot name (the pod's own)")
    _add(p, "--workload", default=None, help="workload hash (the pod's own)")
    _add(p, "--checkpoint", choices=["on-ready", "never"], default="on-ready", help="never: publish nothing")
    _add(p, "--facts", type=Path, default=None, help="node facts JSON (default: facts.json beside --plan)")
    _add(p, "--interval", type=float, default=0.5, help="seconds between looks at the work directory")

    p = sub.add_parser("agent", help="node agent: cache budget and Node annotations")
    _add(p, "--cache", type=Path, required=True, help="node cache directory")
    _add(p, "--budget", type=int, required=True, help="cache byte budget")
    _add(p, "--node", default=None, help="this Node's name (downward API)")
    _add(p, "--facts", type=Path, default=None, help="node facts JSON instead of detecting them")
    _add(p, "--interval", type=float, default=30.0, help="seconds between passes")
    _add(p, "--once", action="store_true", default=False, help="one pass, then exit")
    _add(p, "--heartbeat", type=Path, default=None, help="file touched after every pass (liveness)")
    _add(p, "--metrics-port", type=int, default=0, help="serve /metrics and /readyz on this port (0: off)")
    _add(
        p,
        "--allow-without-node-policy",
        action="store_true",
        default=False,
        help="run without the agent's admission policies: then it neither patches its Node nor posts Events",
    )
    _add(p, "--trust", type=Path, default=None, help="advertise only snapshots signed by these keys")

    p = sub.add_parser("healthcheck", help="exit 0 if a heartbeat file was touched recently (a probe)")
    _add(p, "--file", type=Path, required=True, help="the heartbeat file")
    _add(p, "--max-age", type=float, required=True, help="seconds since its last touch")

    check = sub.add_parser("check", help="preflight: can this node, or this cluster, restore? (exit 0 or 1)")
    csub = check.add_subparsers(dest="check_command", required=True, parser_class=_Parser)
    p = csub.add_parser("node", help="kernel, CRIU, capabilities, driver, CUDA checkpoint API, cache")
    _add(p, "--cache", type=Path, default=Path("/var/lib/thaw/cache"), help="node cache directory")
    _add(p, "--min-free", type=int, default=50 << 30, help="free bytes the cache's filesystem should have")
    _add(p, "--budget", type=int, default=None, help="the agent's cache budget, to compare with the disk")
    _add(p, "--criu", default=None, help="CRIU binary (default: THAW_CRIU, PATH, the bundled one)")
    p = csub.add_parser(
        "cluster", help="webhook, certificates, scheduler wiring, agent, namespaces, keys, store"
    )
    _add(
        p,
        "--kubeconfig",
        default=None,
        help="kubeconfig (default: in-cluster, then KUBECONFIG, ~/.kube/config)",
    )
    _add(p, "--namespace", default="thaw-system", help="Thaw's namespace")

    p = sub.add_parser("simulate", help="replay a synthetic cluster through the placement policies")
    _add(p, "--nodes", type=int, default=64, help="number of GPU nodes")
    _add(p, "--pods", type=int, default=2000, help="number of pod arrivals")
    _add(p, "--seed", type=int, default=1, help="random seed")
    _add(p, "--plot", type=Path, default=None, help="write a PNG of time-to-ready per policy")

    p = sub.add_parser("gc", help="store retention: keep the newest N per workload and what nodes hold")
    _store_flags(p, required=True)
    _add(p, "--keep", type=int, default=3, help="snapshots kept per (namespace, name, workload)")
    _add(p, "--namespace", default=None, help="only this namespace (default: every one the store lists)")
    _add(p, "--name", default=None, help="only this snapshot name (with --namespace)")
    _add(
        p, "--dry-run", action="store_true", default=False, help="list what would be deleted; delete nothing"
    )

    p = sub.add_parser("status", help="nodes, their cached snapshots and facts, from the cluster")
    _add(p, "--output", choices=["table", "json"], default="table", help="output format")
    sub.add_parser("demo", help="run the whole path on this machine with an embedded example")
    return parser


# command -> "module:function"; the function takes the parsed arguments and returns an exit code.
COMMANDS: dict[str, str] = {
    "webhook": "webhook.cli:run",
    "extender": "extender.cli:run",
    "certs": "thaw.serve.certs_cmd:run",
    "keys": "thaw.contract.signing:run_keys",
    "publish": "thaw.snapshot.store:run_publish",
    "fetch": "thaw.snapshot.fetch:run",
    "capture-pod-files": "thaw.runtime.podfiles:run_capture",
    "exec": "thaw.runtime.execute:run",
    "install-runtime": "thaw.runtime.install:run",
    "sidecar": "thaw.runtime.sidecar:run",
    "agent": "thaw.node.agent:run",
    "healthcheck": "thaw.node.agent:run_healthcheck",
    "check": "thaw.check.cmd:run",
    "gc": "thaw.node.gc:run",
    "simulate": "extender.simulate:run",
    "status": "thaw.node.status:run",
    "demo": "thaw.dev.demo:run",
}


def _resolve(spec: str) -> Callable[[argparse.Namespace], int]:
    module, _, func = spec.partition(":")
    fn: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module), func)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _resolve(COMMANDS[args.command])(args)
    except UsageError as exc:
        sys.stderr.write(f"thaw {args.command}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("thaw %s failed", args.command, exc_info=True)
        sys.stderr.write(f"thaw {args.command}: {type(exc).__name__}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
