"""Node facts and the compatibility key (DESIGN.md, "Node annotations").

A snapshot can be restored only on a node whose facts are exactly those it was taken on: the key is
the first 16 hex digits of the sha256 of the facts' canonical JSON. Pure functions, and the facts
file (``facts.json``) that ``thaw fetch`` writes beside the plan so that every Thaw container of a pod
uses the same facts; detecting a node's facts (NVML, uname, criu --version) is
thaw.snapshot.nodefacts'.

The facts are the *node's*: ``gpu.count`` counts every GPU of the node, whatever the container was
given (a container's own GPUs are in the manifest's GPU layout), so a workload container, the
GPU-less ``thaw-fetch`` and the agent all compute the same key on one node.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, TypedDict

import orjson

from thaw.contract.canonical import canonical_json, digest
from thaw.contract.safeio import read_bounded

COMPAT_KEY_HEX_DIGITS = 16


class GpuFacts(TypedDict):
    product: str
    count: int


class NodeFacts(TypedDict):
    arch: str
    kernel: str
    gpu: GpuFacts
    driver: str
    criu: str


FACT_KEYS = ("arch", "kernel", "gpu", "driver", "criu")
FACTS_NAME = "facts.json"  # beside plan.json in the plan emptyDir
MAX_FACTS_BYTES = 64 * 1024


class FactsError(ValueError):
    """Facts that are not the documented shape; the message says which field and why."""


def compat_key(facts: NodeFacts | dict[str, Any]) -> str:
    """The compatibility key of a node's facts: first 16 hex digits of sha256(canonical JSON)."""
    return digest(facts)[:COMPAT_KEY_HEX_DIGITS]


def validate_facts(value: Any) -> NodeFacts:
    """Check that ``value`` has the documented facts shape, and return it typed."""
    if not isinstance(value, dict):
        raise FactsError(f"node facts must be a JSON object, got {type(value).__name__}")
    missing = [k for k in FACT_KEYS if k not in value]
    if missing:
        raise FactsError(f"node facts lack {', '.join(missing)} (required: {', '.join(FACT_KEYS)})")
    for key in ("arch", "kernel", "driver", "criu"):
        if not isinstance(value[key], str):
            raise FactsError(f"node facts field {key!r} must be a string, got {value[key]!r}")
    gpu = value["gpu"]
    if (
        not isinstance(gpu, dict)
        or not isinstance(gpu.get("product"), str)
        or not isinstance(gpu.get("count"), int)
        or isinstance(gpu.get("count"), bool)
        or gpu["count"] < 0
    ):
        raise FactsError(
            f'node facts field \'gpu\' must be {{"product": string, "count": integer >= 0}}, got {gpu!r}'
        )
    return value  # type: ignore[return-value]  # shape checked above


def facts_path(plan_path: Path) -> Path:
    """Where ``thaw fetch`` leaves the facts it used: ``facts.json`` beside the plan."""
    return plan_path.parent / FACTS_NAME


def read_facts_file(path: Path) -> NodeFacts:
    """Facts from a file: bounded (regular file, no symlink, no FIFO, at most 64 KiB) and validated.
    FactsError naming the file and what is wrong."""
    try:
        raw = read_bounded(path, MAX_FACTS_BYTES)
    except OSError as exc:
        raise FactsError(f"cannot read facts file {path}: {exc.strerror or exc}") from None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise FactsError(f"facts file {path} is not JSON ({exc})") from None
    try:
        return validate_facts(value)
    except FactsError as exc:
        raise FactsError(f"facts file {path}: {exc}") from None


def write_facts_file(path: Path, facts: NodeFacts) -> None:
    """Write ``facts`` atomically (a reader sees the old file, none, or the whole new one), readable
    by the workload container's user."""
    validate_facts(facts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(canonical_json(facts) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
