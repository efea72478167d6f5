"""Node facts and the compatibility key (DESIGN.md, "Node annotations").

A snapshot can be restored only on a node whose facts are exactly those it was taken on: the key is
the first 16 hex digits of the sha256 of the facts' canonical JSON. Pure functions only; detecting a
node's facts (NVML, uname, criu --version) lives with the runtime.
"""

from __future__ import annotations

from typing import Any, TypedDict

from thaw.contract.canonical import digest

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
