"""``thaw check node|cluster``: print the lines, exit 1 when one fails."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from thaw.check.lines import Line, exit_code, render


def api_client(kubeconfig: str | None) -> Any:
    """An ApiClient from ``kubeconfig``, else in-cluster, else KUBECONFIG / ~/.kube/config."""
    from kubernetes import config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    from kubernetes import client

    return client.ApiClient()


def run(args: argparse.Namespace) -> int:
    lines: list[Line]
    if args.check_command == "node":
        from thaw.check.node import run_node

        lines = run_node(args.cache, args.min_free, args.budget, args.criu)
    else:
        from thaw.check.cluster import run_cluster

        lines = run_cluster(api_client(args.kubeconfig), args.namespace)
    sys.stdout.write(render(lines))
    sys.stdout.flush()
    return exit_code(lines)
