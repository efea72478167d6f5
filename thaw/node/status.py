"""``thaw status``: every node's facts and cached snapshots, as the agents published them.

Reads Nodes through the official client (in-cluster config or KUBECONFIG), parses ``thaw.dev/facts``
and ``thaw.dev/cache`` with the same parsers the extender uses, and prints a table (or JSON). A node
whose annotations are missing or malformed is shown with the reason, not skipped: that is usually
the thing an operator is looking for.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

import orjson

from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.facts import FactsError, NodeFacts, compat_key, validate_facts
from thaw.contract.inventory import Inventory, InventoryError, parse_inventory

GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_DRIVER = "nvidia.com/cuda.driver-version.full"


class StatusError(Exception):
    """The cluster could not be read."""


@dataclass
class NodeStatus:
    name: str
    facts: NodeFacts | None = None
    facts_error: str | None = None
    cache: Inventory | None = None
    cache_error: str | None = None
    gfd: dict[str, str] = field(default_factory=dict)  # GPU Feature Discovery labels, when no facts


def node_status(name: str, annotations: dict[str, str] | None, labels: dict[str, str] | None) -> NodeStatus:
    """One node's status from its annotations and labels. Pure."""
    annotations, labels = annotations or {}, labels or {}
    st = NodeStatus(name)
    raw_facts = annotations.get(NODE_FACTS)
    if raw_facts is None:
        st.facts_error = "no thaw.dev/facts (agent not running here?)"
        st.gfd = {k: labels[k] for k in (GFD_PRODUCT, GFD_COUNT, GFD_DRIVER) if k in labels}
    else:
        try:
            st.facts = validate_facts(orjson.loads(raw_facts))
        except (orjson.JSONDecodeError, FactsError) as exc:
            st.facts_error = f"invalid thaw.dev/facts: {exc}"
    raw_cache = annotations.get(NODE_CACHE)
    if raw_cache is None:
        st.cache_error = "no thaw.dev/cache"
    else:
        try:
            st.cache = parse_inventory(raw_cache)
        except InventoryError as exc:
            st.cache_error = f"invalid thaw.dev/cache: {exc}"
    return st


def _size(n: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def render_table(nodes: list[NodeStatus]) -> str:
    """A fixed-width table, one row per node, its cached snapshots indented below it. Pure."""
    header = ("NODE", "GPU", "DRIVER", "CRIU", "KERNEL", "COMPAT", "FREE", "RESTORING", "SNAPSHOTS")
    rows: list[tuple[str, ...]] = []
    details: list[list[str]] = []
    for n in sorted(nodes, key=lambda n: n.name):
        if n.facts is not None:
            f = n.facts
            gpu = f"{f['gpu']['count']}x {f['gpu']['product']}" if f["gpu"]["count"] else "none"
            facts_cols = (gpu, f["driver"], f["criu"], f["kernel"], compat_key(f))
        elif n.gfd:
            gpu = f"{n.gfd.get(GFD_COUNT, '?')}x {n.gfd.get(GFD_PRODUCT, '?')} (GFD)"
            facts_cols = (gpu, n.gfd.get(GFD_DRIVER, "?"), "?", "?", "-")
        else:
            facts_cols = ("?", "?", "?", "?", "-")
        if n.cache is not None:
            inv = n.cache
            cache_cols = (_size(inv["free_bytes"]), str(inv.get("restoring", 0)), str(len(inv["snapshots"])))
        else:
            cache_cols = ("-", "-", "-")
        rows.append((n.name, *facts_cols, *cache_cols))
        lines = [f"  ! {e}" for e in (n.facts_error, n.cache_error) if e]
        for s in n.cache["snapshots"] if n.cache else []:
            lines.append(
                f"  - {s['name']}  {s['id'][:19]}…  {s['tier']:6}  {_size(s['bytes']):>9}  "
                f"last used {s['last_used']}  workload {s['workload'][:12]}  compat {s['compat']}"
            )
        details.append(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for row, lines in zip(rows, details, strict=True):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        out.extend(lines)
    if not rows:
        out.append("(no nodes)")
    return "\n".join(out) + "\n"


def render_json(nodes: list[NodeStatus]) -> str:
    return (
        orjson.dumps(
            [
                {
                    "node": n.name,
                    "facts": n.facts,
                    "compat": compat_key(n.facts) if n.facts else None,
                    "facts_error": n.facts_error,
                    "cache": n.cache,
                    "cache_error": n.cache_error,
                    "gfd": n.gfd or None,
                }
                for n in sorted(nodes, key=lambda n: n.name)
            ],
            option=orjson.OPT_INDENT_2,
        ).decode()
        + "\n"
    )


def list_node_status(api: Any) -> list[NodeStatus]:
    return [
        node_status(item.metadata.name, item.metadata.annotations, item.metadata.labels)
        for item in api.list_node().items
    ]


def run(args: argparse.Namespace) -> int:
    """``thaw status [--output table|json]``."""
    import logging

    from thaw.node.agent import core_api

    logging.getLogger("urllib3").setLevel(logging.ERROR)  # one line on failure, not a retry log
    api = core_api()
    try:
        nodes = list_node_status(api)
    except Exception as exc:
        reason = getattr(exc, "reason", None) or exc
        raise StatusError(f"cannot list Nodes from {api.api_client.configuration.host}: {reason}") from None
    sys.stdout.write(render_json(nodes) if args.output == "json" else render_table(nodes))
    return 0
