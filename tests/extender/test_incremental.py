"""The index updates its precomputed answers per changed node; after any sequence of changes they
are exactly what an index built from scratch on the same nodes (and the same placed pods) holds."""

from __future__ import annotations

import random
import time
from typing import Any

import orjson
import pytest

from extender import handlers
from extender.index import Memo, NodeIndex
from extender.nodes import NodeEntry
from extender.scoring import Decision
from extender.synthetic import H100_FACTS, H200_FACTS, WORKLOAD, cached, node
from thaw.contract.annotations import NODE_CACHE
from thaw.contract.inventory import Tier

SNAP = "qwen3-8b-vllm"
KEYS = [(SNAP, WORKLOAD), ("other-model", WORKLOAD), (SNAP, "sha256:" + "cd" * 32)]


def random_node(rng: random.Random, name: str, rv: int) -> dict[str, Any]:
    facts = rng.choice([H100_FACTS, H100_FACTS, H100_FACTS, H200_FACTS, None])
    gfd = facts is not None and rng.random() < 0.15
    snaps = []
    if facts is not None and not gfd:
        for snap, workload in KEYS:
            if rng.random() < 0.4:
                size = rng.choice([8_100_000_000, 8_100_000_000, 8_100_000_000, 9_000_000_000])
                tier: Tier = rng.choice(["memory", "disk"])
                snaps.append(cached(snap, size, tier, facts=facts, workload=workload))
    n = node(
        name,
        facts=facts,
        snapshots=None if gfd else snaps,
        restoring=rng.choice([0, 0, 1, 3]),
        gfd=gfd,
        resource_version=str(rv),
    )
    if rng.random() < 0.05 and not gfd:
        n["metadata"]["annotations"][NODE_CACHE] = '{"v": 1, "snapshots": "broken"}'
    return n


def contents(memo: Memo) -> tuple[Any, ...]:
    return (
        memo.fragments,
        memo.keeps,
        memo.fails,
        [sorted(b) for b in memo.by_score],
        memo.variants,
        memo.known_facts,
        memo.node_count,
    )


@pytest.mark.parametrize("seed", range(6))
def test_incremental_answers_equal_a_fresh_index(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"n{i}" for i in range(24)]
    idx = NodeIndex()
    current = {n: random_node(rng, n, 1) for n in names[:16]}
    idx.replace_all(list(current.values()), "1")
    for key in KEYS[:2]:
        idx.decisions(*key)  # memos that live through every change below
    t = time.monotonic() + 3600  # the test's clock: ahead, so that real-time expiry leaves it be
    for step in range(400):
        op = rng.random()
        name = rng.choice(names)
        if op < 0.6:
            current[name] = random_node(rng, name, step + 2)
            idx.upsert(current[name])
        elif op < 0.75:
            current.pop(name, None)
            idx.delete(name)
        elif op < 0.9:
            t += rng.random() * 10
            idx.note_placed(f"pod-{rng.randrange(30)}", name, now=t)
        else:
            t += rng.random() * 20
            idx.expire_placed(now=t)
        if step == 150:
            idx.decisions(*KEYS[2])  # one created half-way
        if step % 7 == 0:  # answers in between: the kept views are patched, not rebuilt
            answers(idx)
    fresh = NodeIndex()
    fresh.replace_all(list(current.values()), "x")
    fresh.placed_on.update(idx.placed_on)
    fresh._applied.update(idx._applied)  # the counts as the decisions read them
    for key in KEYS:
        assert contents(idx.decisions(*key)) == contents(fresh.decisions(*key)), key
    assert answers(idx) == answers(fresh)


def answers(idx: NodeIndex) -> list[bytes]:
    """Both verbs' answers about every node (and one the view does not know), for each key."""
    out = []
    for snapshot, workload in KEYS:
        pod = {
            "metadata": {
                "name": "p",
                "annotations": {
                    "thaw.dev/snapshot": snapshot,
                    "thaw.dev/workload": workload,
                    "thaw.dev/placement": "required",
                },
            }
        }
        body = orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": [*(f"n{i}" for i in range(24)), "nope"]})
        for fn in (handlers.filter_deferred, handlers.prioritize_deferred):
            status, answer, _ = fn(idx, body)  # the placement is not noted: the counts stay
            assert status == 200
            out.append(answer)
    return out


def test_a_node_change_recomputes_only_what_it_reaches(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [
        node(f"n{i}", snapshots=[cached(SNAP, 8_100_000_000, "disk")] if i < 10 else []) for i in range(100)
    ]
    idx = NodeIndex()
    idx.replace_all(items, "1")
    memo = idx.decisions(SNAP, WORKLOAD)
    other = idx.decisions("other-model", WORKLOAD)
    seen: list[str] = []
    decide = Memo.decide

    def counted(self: Memo, e: NodeEntry) -> Decision:
        seen.append(e.name)
        return decide(self, e)

    monkeypatch.setattr(Memo, "decide", counted)
    # A node's own queue: that node, once per memo.
    idx.upsert(node("n50", snapshots=[], restoring=2, resource_version="2"))
    assert seen == ["n50", "n50"]
    # A tier flip on a holder: holders unchanged, that node only.
    seen.clear()
    idx.upsert(node("n3", snapshots=[cached(SNAP, 8_100_000_000, "memory")], resource_version="3"))
    assert sorted(seen) == ["n3", "n3"]
    # A new holder: the holders' spread damping moves, in that snapshot's memo only, and only their
    # score is redone from the kept estimate (Memo._respread): no other decision is recomputed.
    seen.clear()
    rescored: list[str] = []
    piece = Memo._piece

    def counted_piece(self: Memo, name: str, score: int, restorable: bool, reason: str) -> None:
        rescored.append(name)
        piece(self, name, score, restorable, reason)

    monkeypatch.setattr(Memo, "_piece", counted_piece)
    idx.upsert(node("n60", snapshots=[cached(SNAP, 8_100_000_000, "disk")], resource_version="4"))
    assert seen == ["n60", "n60"]
    assert sorted(set(rescored)) == sorted({f"n{i}" for i in range(10)} | {"n60"})
    assert "n60" in memo.fragments and "n60" not in other.fragments  # no build of other-model anywhere
