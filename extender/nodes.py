"""Parse a Node object into what the extender needs, once, when the Node changes.

Everything that involves JSON in annotations happens here, on the watch thread (or when a
``--nodes`` file is loaded), never on the request path. A :class:`NodeEntry` carries the node's
compatibility key, its cached snapshot copies and its restore queue, ready for the index.

Facts come from the ``thaw.dev/facts`` annotation (written by the node agent). Where the agent has
not run yet, NVIDIA GPU Feature Discovery labels give *partial* facts (GPU product, driver; arch from
``kubernetes.io/arch``, the kernel series from ``status.nodeInfo``): the fields of the compatibility
key that labels carry, compared as the key compares them (thaw.contract.facts.compat_fields), enough
to tell that a node cannot restore a snapshot taken on other hardware, never enough to compute its
key (the CRIU version and the CPU flags are unknown), and such a node holds no cache anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.facts import FactsError, compat_fields, compat_key, kernel_series, validate_facts
from thaw.contract.inventory import InventoryError, Tier, parse_inventory

log = logging.getLogger(__name__)

GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_DRIVER = "nvidia.com/cuda.driver-version.full"
ARCH_LABEL = "kubernetes.io/arch"
# kubernetes.io/arch uses Go's GOARCH names; facts use uname -m.
_GOARCH_TO_UNAME = {"amd64": "x86_64", "arm64": "aarch64", "ppc64le": "ppc64le", "s390x": "s390x"}

FactsSource = Literal["annotation", "gfd", "none"]


@dataclass(frozen=True, slots=True)
class CachedCopy:
    """One snapshot copy a node holds (an entry of its ``thaw.dev/cache``)."""

    name: str
    workload: str
    compat: str
    bytes: int
    tier: Tier


@dataclass(slots=True)
class NodeEntry:
    name: str
    resource_version: str
    facts_source: FactsSource
    # Key of the full facts (annotation only); None when facts are partial or missing.
    compat: str | None
    # Partial facts from GFD labels, flattened as flatten_facts does (arch, kernel series,
    # gpu.product, driver): only the fields that are known. Empty for annotation facts (compat says
    # it all) and for no facts.
    partial: dict[str, str | int] = field(default_factory=dict)
    # The key's fields of full facts, flattened the same way (annotation only), so partial facts
    # can be compared.
    flat_facts: dict[str, str | int] = field(default_factory=dict)
    copies: tuple[CachedCopy, ...] = ()
    restoring: float = 0  # the agent reports a count; the index adds the pods it placed (1/k each)
    free_bytes: int = 0
    # The node's measured fetch throughput (thaw.dev/cache "fetch"), bytes/s; None: not reported.
    fetch_bps: float | None = None
    # Why an annotation could not be read (logged once per value, see parse_node's caller).
    problems: tuple[str, ...] = ()
    # The raw inputs this entry was parsed from: an update with the same inputs changes nothing.
    source: tuple[Any, ...] = ()


def flatten_facts(facts: Mapping[str, Any]) -> dict[str, str | int]:
    """The compatibility key's fields that labels can carry, as the key reads them (kernel series,
    CRIU major version; thaw.contract.facts.compat_fields): ``{"arch", "kernel", "gpu.product",
    "driver", "criu"}``. Two nodes with one key flatten the same."""
    key = compat_fields(facts)
    return {
        "arch": key["arch"],
        "kernel": key["kernel"],
        "gpu.product": key["gpu"],
        "driver": key["driver"],
        "criu": key["criu"],
    }


def _gfd_facts(labels: Mapping[str, str], node_info: Mapping[str, Any]) -> dict[str, str | int]:
    product = labels.get(GFD_PRODUCT)
    if not product:
        return {}
    out: dict[str, str | int] = {"gpu.product": product}  # the GPU count is not in the key
    if labels.get(GFD_DRIVER):
        out["driver"] = labels[GFD_DRIVER]
    arch = labels.get(ARCH_LABEL)
    if arch:
        out["arch"] = _GOARCH_TO_UNAME.get(arch, arch)
    kernel = node_info.get("kernelVersion")
    if isinstance(kernel, str) and kernel:
        out["kernel"] = kernel_series(kernel)
    return out


def node_source(node: Mapping[str, Any]) -> tuple[Any, ...]:
    """The parts of a Node the extender reads; a Node whose source is unchanged needs no re-parse.

    kubelet rewrites Node status every few minutes; comparing this tuple keeps those updates off
    the index (and off the scoring caches).
    """
    meta = node.get("metadata") or {}
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    info = (node.get("status") or {}).get("nodeInfo") or {}
    return (
        ann.get(NODE_FACTS),
        ann.get(NODE_CACHE),
        labels.get(GFD_PRODUCT),
        labels.get(GFD_COUNT),
        labels.get(GFD_DRIVER),
        labels.get(ARCH_LABEL),
        info.get("kernelVersion") if isinstance(info, Mapping) else None,
    )


class NodeError(ValueError):
    """A Node object without the shape every Node has (metadata.name)."""


def parse_node(node: Mapping[str, Any]) -> NodeEntry:
    """Parse one Node (a dict as the API sends it). Raises NodeError only without a name.

    Unreadable Thaw annotations do not raise: the node is kept with no facts or no cache, and the
    reason is in ``problems`` (the node ranks as holding nothing, as the contract says).
    """
    if not isinstance(node, Mapping):
        raise NodeError(f"a Node must be a JSON object, got {type(node).__name__}")
    meta = node.get("metadata")
    if not isinstance(meta, Mapping) or not isinstance(meta.get("name"), str) or not meta["name"]:
        raise NodeError("a Node must have metadata.name (a non-empty string)")
    name: str = meta["name"]
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if not isinstance(ann, Mapping) or not isinstance(labels, Mapping):
        raise NodeError(f"node {name}: metadata.annotations and metadata.labels must be objects")
    status = node.get("status") or {}
    info = status.get("nodeInfo") if isinstance(status, Mapping) else None
    info = info if isinstance(info, Mapping) else {}
    problems: list[str] = []

    facts_source: FactsSource = "none"
    compat: str | None = None
    flat: dict[str, str | int] = {}
    partial: dict[str, str | int] = {}
    raw_facts = ann.get(NODE_FACTS)
    if raw_facts is not None:
        try:
            facts = validate_facts(orjson.loads(raw_facts))
            compat = compat_key(facts)
            flat = flatten_facts(facts)
            facts_source = "annotation"
        except (orjson.JSONDecodeError, FactsError, TypeError) as exc:
            problems.append(f"{NODE_FACTS} unreadable ({exc})")
    if facts_source == "none":
        partial = _gfd_facts(labels, info)
        if partial:
            facts_source = "gfd"

    copies: tuple[CachedCopy, ...] = ()
    restoring: float = 0
    free = 0
    fetch_bps: float | None = None
    raw_cache = ann.get(NODE_CACHE)
    if raw_cache is not None:
        try:
            if not isinstance(raw_cache, str):
                raise InventoryError("must be a string holding JSON")
            inv = parse_inventory(raw_cache)
            copies = tuple(
                CachedCopy(s["name"], s["workload"], s["compat"], s["bytes"], s["tier"])
                for s in inv["snapshots"]
            )
            restoring = inv.get("restoring", 0)
            free = inv["free_bytes"]
            fetch_bps = inv["fetch"]["bps"] if "fetch" in inv else None
        except InventoryError as exc:
            problems.append(f"{NODE_CACHE} unreadable ({exc}); ranked as holding no snapshot")

    rv = meta.get("resourceVersion")
    return NodeEntry(
        name=name,
        resource_version=rv if isinstance(rv, str) else "",
        facts_source=facts_source,
        compat=compat,
        partial=partial,
        flat_facts=flat,
        copies=copies,
        restoring=restoring,
        free_bytes=free,
        fetch_bps=fetch_bps,
        problems=tuple(problems),
        source=node_source(node),
    )


def load_node_list(path: Path) -> tuple[list[dict[str, Any]], str]:
    """Read a NodeList (JSON or YAML) file: its items and its resourceVersion.

    Also accepts a bare list of Nodes. Raises ValueError naming the file and what was expected.
    """
    text = path.read_bytes()
    try:
        doc: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        import yaml

        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: neither JSON nor YAML ({exc})") from None
    if isinstance(doc, list):
        items, rv = doc, ""
    elif isinstance(doc, dict) and isinstance(doc.get("items"), list):
        items = doc["items"]
        rv = str((doc.get("metadata") or {}).get("resourceVersion") or "")
    else:
        raise ValueError(f"{path}: expected a NodeList (an object with 'items') or a list of Nodes")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: items[{i}] is not a Node object")
    return items, rv
