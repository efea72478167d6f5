"""The node watch through the official kubernetes client against tests/fakekube.py."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from kubernetes import client

from extender.index import NodeIndex
from extender.synthetic import H100_FACTS, WORKLOAD, cached, node
from extender.watch import NodeWatch
from tests.fakekube import FakeKube, running
from thaw.contract.annotations import NODE_CACHE
from thaw.dev.sandbox import wait_for


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with running(bookmark_interval_s=0.2) as k:
        for i in range(5):
            k.add(node(f"gpu-{i}", snapshots=[]))
        yield k


@pytest.fixture
def watched(kube: FakeKube) -> Iterator[tuple[NodeIndex, NodeWatch]]:
    index = NodeIndex()
    w = NodeWatch(
        index, kube.api_client(), page_size=2, watch_timeout_s=2, backoff_initial_s=0.05, grace_s=0.5
    )
    assert not w.ready()
    w.start()
    wait_for(w.ready, 10, "the first list", interval=0.02)
    yield index, w
    w.stop()


def cache_patch(snapshot: str) -> dict[str, object]:
    inv = {"v": 1, "free_bytes": 1, "snapshots": [cached(snapshot, 10**10, "memory", facts=H100_FACTS)]}
    return {"metadata": {"annotations": {NODE_CACHE: orjson.dumps(inv).decode()}}}


def test_initial_list_is_paginated_and_watch_asks_for_bookmarks(
    kube: FakeKube, watched: tuple[NodeIndex, NodeWatch]
) -> None:
    index, _ = watched
    assert sorted(index.nodes) == [f"gpu-{i}" for i in range(5)]
    lists = [r for r in kube.requests if "watch" not in r and r.startswith("GET /api/v1/nodes?")]
    assert len(lists) == 3 and "continue=" in lists[1]  # 5 nodes, limit 2
    wait_for(
        lambda: any("watch=True" in r or "watch=true" in r for r in kube.requests),
        10,
        "a watch",
        interval=0.02,
    )
    watch_req = next(r for r in kube.requests if "watch=" in r)
    assert (
        "allowWatchBookmarks=true" in watch_req and f"resourceVersion={index.resource_version}" in watch_req
    )


def test_patch_through_the_client_reaches_the_index(
    kube: FakeKube, watched: tuple[NodeIndex, NodeWatch]
) -> None:
    index, _ = watched
    core = client.CoreV1Api(kube.api_client())
    # The client sends a dict body as a strategic merge patch, as the node agent will.
    core.patch_node("gpu-3", cache_patch("llama-70b"))
    wait_for(
        lambda: any(c.name == "llama-70b" for c in index.nodes["gpu-3"].copies),
        10,
        "the MODIFIED event",
        interval=0.02,
    )
    assert index.decisions("llama-70b", WORKLOAD).decision("gpu-3").tier == "memory"
    kube.add(node("gpu-9"))
    kube.delete("gpu-0")
    wait_for(
        lambda: "gpu-9" in index.nodes and "gpu-0" not in index.nodes, 10, "ADDED and DELETED", interval=0.02
    )


def test_bookmarks_advance_the_resource_version(kube: FakeKube, watched: tuple[NodeIndex, NodeWatch]) -> None:
    index, _ = watched
    kube.update("gpu-1", {"metadata": {"labels": {"x": "1"}}})  # not read by the extender
    rv = str(kube.resource_version)
    wait_for(
        lambda: index.resource_version == rv,
        10,
        "the resourceVersion of the event or a bookmark",
        interval=0.02,
    )


def test_410_gone_relists_and_sees_changes_made_meanwhile(
    kube: FakeKube, watched: tuple[NodeIndex, NodeWatch]
) -> None:
    index, w = watched
    before = w.relists
    kube.drop_watches()  # the watch reconnects from its resourceVersion...
    kube.update("gpu-2", cache_patch("mistral-7b"))
    kube.delete("gpu-4")
    kube.compact()  # ...which is now too old: an ERROR event with a 410 Status
    kube.drop_watches()
    wait_for(lambda: w.relists > before, 10, "a relist after 410 Gone", interval=0.02)
    wait_for(lambda: "gpu-4" not in index.nodes, 10, "the relisted view", interval=0.02)
    assert any(c.name == "mistral-7b" for c in index.nodes["gpu-2"].copies)
    assert w.ready()


def test_expired_watch_gets_the_status_kube_apiserver_sends(kube: FakeKube) -> None:
    kube.compact()
    kube.add(node("gpu-7"))
    core = client.CoreV1Api(kube.api_client())
    resp = core.list_node(watch=True, resource_version="101", _preload_content=False, timeout_seconds=1)
    first = orjson.loads(resp.readline())  # type: ignore[attr-defined]  # raw urllib3 response
    assert first == {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: 101 ({kube.resource_version - 1})",
            "reason": "Expired",
            "code": 410,
        },
    }


def test_readiness_follows_an_outage(kube: FakeKube, watched: tuple[NodeIndex, NodeWatch]) -> None:
    _, w = watched
    kube.fail_next_lists(1000)
    kube.drop_watches()
    wait_for(lambda: not w.ready(), 10, "not ready after the grace period", interval=0.02)
    kube.fail_next_lists(0)
    wait_for(w.ready, 15, "ready again after a relist", interval=0.02)
