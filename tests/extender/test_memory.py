"""What the index retains stays bounded: annotation churn leaves nothing behind, and the precomputed
answers of many snapshots stay within MEMO_ENTRIES (measured with tracemalloc, retained bytes)."""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import pytest

from extender import handlers
from extender.index import MEMO_ENTRIES, NodeIndex
from extender.scoring import Params
from extender.synthetic import WORKLOAD, cluster, node
from thaw.contract.annotations import NODE_CACHE

MiB = 2**20


@contextmanager
def retained() -> Iterator[Callable[[], float]]:
    """Bytes allocated inside the block and still alive at its end (after a collection), in MiB."""
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    result: list[float] = []
    try:
        yield lambda: result[0]
    finally:
        gc.collect()
        result.append((tracemalloc.get_traced_memory()[0] - base) / MiB)
        tracemalloc.stop()


def test_annotation_churn_leaves_nothing_behind(caplog: pytest.LogCaptureFixture) -> None:
    # 2,000 updates of unreadable 60 KB cache annotations on 10 nodes (each logged once), then the
    # nodes are fixed. Before, every text was kept as the key of "already logged": 115 MiB.
    caplog.set_level(logging.CRITICAL, logger="extender.index")
    idx = NodeIndex()
    idx.replace_all([node(f"n{i}", snapshots=[]) for i in range(10)], "1")
    idx.decisions("some-model", WORKLOAD)
    with retained() as used:
        for u in range(2000):
            n = node(f"n{u % 10}", snapshots=[], resource_version=str(u + 2))
            n["metadata"]["annotations"][NODE_CACHE] = '{"v":1,"bad":"' + str(u) + "x" * 60_000 + '"}'
            idx.upsert(n)
        for i in range(10):
            idx.upsert(node(f"n{i}", snapshots=[], resource_version="999999"))
    assert used() < 1.0, f"{used():.1f} MiB retained"


def test_an_annotation_that_is_not_a_string_is_a_problem_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    idx = NodeIndex()
    n = node("odd", snapshots=[])
    n["metadata"]["annotations"][NODE_CACHE] = {"v": 1}  # a --nodes file can say anything
    idx.replace_all([n], "1")
    assert idx.upsert({**n, "metadata": {**n["metadata"], "resourceVersion": "2"}}) is False
    assert "must be a string holding JSON" in caplog.text
    assert idx.decisions("m", WORKLOAD).decision("odd").tier == "cold"


def test_many_snapshots_answers_stay_within_the_budget() -> None:
    doc = cluster(5000)
    items = orjson.loads(orjson.dumps(doc["items"]))
    idx = NodeIndex(Params(placed_window_s=0))
    idx.replace_all(items, "1")
    del items
    names = [n["metadata"]["name"] for n in doc["items"]]
    with retained() as used:
        for k in range(36):  # each asked about two node lists (a filter's and a prioritize's)
            pod = {
                "metadata": {
                    "name": "p",
                    "annotations": {
                        "thaw.dev/snapshot": f"model-{k}",
                        "thaw.dev/workload": WORKLOAD,
                        "thaw.dev/placement": "required",
                    },
                }
            }
            for asked in (names, names[:4000]):
                body = orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": asked})
                assert handlers.filter_(idx, body)[0] == handlers.prioritize(idx, body)[0] == 200
            memo = idx.decisions(f"model-{k}", WORKLOAD)
            assert len(memo.keeps) + len(memo.fails) == 5000  # every node's answer, precomputed
    assert len(idx._memo) <= MEMO_ENTRIES // 5000
    # Before: up to 256 memos of ~21 MiB each at 5,000 nodes. Now ~2.2 MiB each with their two
    # node lists, 32 at most.
    assert used() < 80, f"{used():.1f} MiB retained"
