"""Wire types of ``k8s.io/kube-scheduler/extender/v1``, with the Go field names as JSON keys.

Only the fields Thaw reads or writes. The captured requests in ``tests/fixtures/k8s/`` show both
``nodeCacheCapable`` modes: ``Nodes`` (a NodeList, full objects) with ``"NodeNames": null``, or
``NodeNames`` with ``"Nodes": null``. The answer uses the same mode as the question.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class NodeList(TypedDict):
    metadata: dict[str, Any]
    items: list[dict[str, Any]]


class ExtenderArgs(TypedDict):
    Pod: dict[str, Any]
    Nodes: NodeList | None
    NodeNames: list[str] | None


class ExtenderFilterResult(TypedDict):
    Nodes: NotRequired[NodeList | None]
    NodeNames: NotRequired[list[str] | None]
    FailedNodes: dict[str, str]
    FailedAndUnresolvableNodes: NotRequired[dict[str, str]]
    Error: str


class HostPriority(TypedDict):
    Host: str
    Score: int


HostPriorityList = list[HostPriority]

# extender/v1 MaxExtenderPriority: the scheduler multiplies by weight * (100 / 10).
MAX_EXTENDER_PRIORITY = 10
