"""``thaw extender``: serve the scheduler extender under gunicorn (one worker, N threads)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from thaw.errors import UsageError

log = logging.getLogger(__name__)


def load_params(path: Path | None) -> Any:
    """Scoring constants from a YAML/JSON mapping of Params field names (others keep defaults)."""
    from extender.scoring import DEFAULT_PARAMS, Params

    if path is None:
        return DEFAULT_PARAMS
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--scoring {path}: {exc}") from None
    allowed = {f.name for f in fields(Params)}
    if not isinstance(doc, dict):
        raise UsageError(f"--scoring {path}: expected a mapping of {', '.join(sorted(allowed))}")
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise UsageError(
            f"--scoring {path}: unknown {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    bad = [k for k, v in doc.items() if isinstance(v, bool) or not isinstance(v, int | float) or v < 0]
    if bad:
        raise UsageError(f"--scoring {path}: {', '.join(bad)} must be numbers >= 0")
    return Params(**{k: float(v) for k, v in doc.items()})


def run(args: argparse.Namespace) -> int:
    from extender import app as app_module
    from extender.nodes import load_node_list
    from thaw.serve.serving import ServeOptions, serve

    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a TCP port (1..65535)")
    if args.threads < 1 or args.workers < 1:
        raise UsageError("--workers and --threads must be at least 1")
    if args.workers != 1:
        log.warning(
            "--workers %d: each worker process runs its own node watch; 1 worker with --threads "
            "is the intended model",
            args.workers,
        )
    nodes: Path | None = args.nodes
    if nodes is not None:
        if not nodes.is_file():
            raise UsageError(f"--nodes {nodes}: no such file (a NodeList as JSON or YAML)")
        try:
            load_node_list(nodes)  # fail here, with the reason, not in a worker
        except ValueError as exc:
            raise UsageError(f"--nodes {exc}") from None
    params = load_params(getattr(args, "scoring", None))
    app_module.CONFIG = app_module.AppConfig(nodes_file=nodes, params=params)
    serve(ServeOptions.from_args("extender.app:create_app", args))
    return 0
