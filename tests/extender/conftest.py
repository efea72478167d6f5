"""A three-node view named like the captured fixtures' nodes (node-1, node-2, node-3)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from extender.index import NodeIndex
from extender.scoring import Params
from extender.synthetic import H100_FACTS, H200_FACTS, WORKLOAD, cached, node

SNAPSHOT = "qwen3-8b-vllm"
SIZE = 8_100_000_000


def fixture_nodes() -> list[dict[str, Any]]:
    """node-1 holds the snapshot in memory, node-2 is compatible but empty (fetch), node-3 is an
    H200 (no build of the snapshot for its facts), gpu-h200 holds the H200 build."""
    return [
        node("node-1", snapshots=[cached(SNAPSHOT, SIZE, "memory")]),
        node("node-2", snapshots=[]),
        node("node-3", facts=H200_FACTS, snapshots=[]),
        node("other-h100", facts=H100_FACTS, snapshots=[cached(SNAPSHOT, SIZE, "disk")]),
    ]


def make_index(placed_window_s: float = 30.0) -> NodeIndex:
    """The fixture nodes' index; ``placed_window_s=0``: answers do not count the pods they place,
    so that asking twice gives the same answer."""
    idx = NodeIndex(Params(placed_window_s=placed_window_s))
    idx.replace_all(fixture_nodes(), "10")
    return idx


@pytest.fixture
def index() -> NodeIndex:
    return make_index()


@pytest.fixture
def still() -> NodeIndex:
    """The fixture nodes' index, not counting placements."""
    return make_index(0.0)


def annotate(args: dict[str, Any], placement: str | None = None, workload: str = WORKLOAD) -> dict[str, Any]:
    out = copy.deepcopy(args)
    ann = out["Pod"]["metadata"].setdefault("annotations", {})
    ann |= {"thaw.dev/snapshot": SNAPSHOT, "thaw.dev/injected": "true", "thaw.dev/workload": workload}
    if placement:
        ann["thaw.dev/placement"] = placement
    return out
