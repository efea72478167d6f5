"""The extender counts the Thaw pods it places, so that a burst of replicas spreads at once instead
of waiting up to 30 s for the agents' ``restoring`` reports (index.py, "Placed pods")."""

from __future__ import annotations

from typing import Any

import orjson

from extender import handlers
from extender.index import NodeIndex
from extender.scoring import Params
from extender.synthetic import WORKLOAD, cached, node
from tests.extender.conftest import SIZE, SNAPSHOT, annotate


def holders(window: float = 30.0, restoring: int = 0) -> NodeIndex:
    """Three nodes that hold the snapshot alike (memory), one that could fetch it."""
    idx = NodeIndex(Params(placed_window_s=window))
    snap = cached(SNAPSHOT, SIZE, "memory")
    items = [node(f"gpu-{c}", snapshots=[snap], restoring=restoring) for c in "abc"]
    idx.replace_all([*items, node("gpu-d", snapshots=[])], "1")
    return idx


def pod(uid: str, placement: str | None = None) -> dict[str, Any]:
    args = {"Pod": {"metadata": {"name": uid, "namespace": "ml", "uid": uid}}, "Nodes": None}
    return annotate({**args, "NodeNames": ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]}, placement)


def top(idx: NodeIndex, args: dict[str, Any]) -> set[str]:
    """The hosts a prioritize answer scores highest (the pod is counted 1/k on each of k)."""
    status, out = handlers.prioritize(idx, orjson.dumps(args))
    scores = orjson.loads(out)
    assert status == 200
    best = max(h["Score"] for h in scores)
    return {h["Host"] for h in scores if h["Score"] == best}


def test_a_uniquely_best_node_counts_the_pod_and_the_next_goes_elsewhere() -> None:
    idx = NodeIndex()
    idx.replace_all(
        [
            node("gpu-a", snapshots=[cached(SNAPSHOT, SIZE, "memory")]),
            node("gpu-b", snapshots=[cached(SNAPSHOT, SIZE, "disk")]),
            node("gpu-d", snapshots=[]),
        ],
        "1",
    )
    args = pod("uid-1")
    args["NodeNames"] = ["gpu-a", "gpu-b", "gpu-d"]
    assert top(idx, args) == {"gpu-a"} and idx.placed_on == {"gpu-a": 1}
    # Counted there, gpu-a (one restore in progress: 2 x 3.3 s) is no longer ahead of gpu-b from
    # disk (7.4 s) on the 0..10 scale: both score 7 against a 50.9 s cold start (a step is ~0.28
    # in ln), so the next pod is counted half on each.
    args["Pod"]["metadata"]["uid"] = "uid-2"
    assert top(idx, args) == {"gpu-a", "gpu-b"} and idx.placed_on == {"gpu-a": 1.5, "gpu-b": 0.5}


def test_tied_holders_share_the_count_until_a_fetch_beats_them() -> None:
    # kube-scheduler breaks ties at random (and spreads a workload's replicas): each of k tied
    # nodes is as likely, so each counts 1/k. Together they fill up until fetching is faster.
    idx = holders()
    tops = [top(idx, pod(f"uid-{i}")) for i in range(20)]
    assert tops[0] == {"gpu-a", "gpu-b", "gpu-c"}
    spill = next(i for i, t in enumerate(tops) if "gpu-d" in t)
    assert all(t == {"gpu-a", "gpu-b", "gpu-c"} for t in tops[:spill]) and 3 <= spill < 20, tops
    held = [idx.placed_on[n] for n in ("gpu-a", "gpu-b", "gpu-c")]
    assert max(held) - min(held) < 1e-9 and abs(sum(idx.placed_on.values()) - 20) < 1e-9


def test_without_the_count_the_answers_never_move() -> None:
    # What the extender did before: only the agents' reports, which a burst never sees, so every
    # replica is told the same and the scheduler's plugins alone keep them apart.
    idx = holders(window=0.0)
    answers = {handlers.prioritize(idx, orjson.dumps(pod(f"uid-{i}")))[1] for i in range(6)}
    assert len(answers) == 1 and idx.placed_on == {}


def test_a_pod_asked_again_counts_once() -> None:
    idx = holders()
    top(idx, pod("uid-1"))
    top(idx, pod("uid-1"))  # a retry of the same pod: its count moves, it does not add up
    assert abs(sum(idx.placed_on.values()) - 1) < 1e-9


def test_counts_expire_after_the_window_and_the_scores_come_back() -> None:
    idx = holders()
    memo = idx.decisions(SNAPSHOT, WORKLOAD)
    before = memo.fragments["gpu-a"]
    idx.note_placed("uid-1", ["gpu-a"], now=100.0)
    assert idx.placed_on == {"gpu-a": 1} and memo.fragments["gpu-a"] != before
    idx.expire_placed(now=129.0)
    assert idx.placed_on == {"gpu-a": 1}
    idx.expire_placed(now=130.0)
    assert idx.placed_on == {} and memo.fragments["gpu-a"] == before


def test_the_agents_report_takes_over_without_counting_twice() -> None:
    idx = holders()
    idx.note_placed("uid-1", ["gpu-a"])
    idx.note_placed("uid-2", ["gpu-a"])
    memo = idx.decisions(SNAPSHOT, WORKLOAD)
    two = memo.decision("gpu-a")
    # The agent's next pass reports the same two restores.
    idx.upsert(node("gpu-a", snapshots=[cached(SNAPSHOT, SIZE, "memory")], restoring=2, resource_version="2"))
    assert memo.decision("gpu-a") == two and "2 restore(s) in progress" in two.reason
    reported = holders(window=0.0, restoring=2).decisions(SNAPSHOT, WORKLOAD).decision("gpu-a")
    assert (two.seconds, two.score) == (reported.seconds, reported.score)


def test_a_filter_that_leaves_one_node_counts_it() -> None:
    # kube-scheduler binds the only feasible node without calling prioritize.
    idx = holders()
    args = pod("uid-1", "required")
    args["NodeNames"] = ["gpu-b", "nowhere"]
    status, out = handlers.filter_(idx, orjson.dumps(args))
    assert status == 200 and orjson.loads(out)["NodeNames"] == ["gpu-b"]
    assert idx.placed_on == {"gpu-b": 1}
    args = pod("uid-2")  # preferred: nothing filtered, but one node asked about is the same
    args["NodeNames"] = ["gpu-c"]
    handlers.filter_(idx, orjson.dumps(args))
    assert idx.placed_on == {"gpu-b": 1, "gpu-c": 1}


def test_pods_that_are_not_thaws_or_cannot_restore_are_not_counted() -> None:
    idx = holders()
    plain = {"Pod": {"metadata": {"name": "p", "uid": "u"}}, "Nodes": None, "NodeNames": ["gpu-a"]}
    for fn in (handlers.filter_, handlers.prioritize):
        fn(idx, orjson.dumps(plain))
    args = pod("uid-9")
    args["Pod"]["metadata"]["annotations"]["thaw.dev/snapshot"] = "no-such-model"
    handlers.prioritize(idx, orjson.dumps(args))
    assert idx.placed_on == {}


def test_a_pod_tied_on_many_nodes_is_not_counted() -> None:
    # 1/k of a pod on each of k > PLACED_TIES nodes moves no score; the scheduler spreads those.
    from extender.index import PLACED_TIES

    idx = NodeIndex()
    snap = cached(SNAPSHOT, SIZE, "memory")
    idx.replace_all([node(f"gpu-{i:03d}", snapshots=[snap]) for i in range(PLACED_TIES + 1)], "1")
    args = pod("uid-1")
    args["NodeNames"] = list(idx.nodes)
    assert len(top(idx, args)) == PLACED_TIES + 1 and idx.placed_on == {}
    args["NodeNames"] = args["NodeNames"][:PLACED_TIES]
    top(idx, args)
    assert len(idx.placed_on) == PLACED_TIES
