"""The node index: every Node parsed once, every live decision precomputed, updated per node.

Writers (the watch thread, a ``--nodes`` file reload, and requests noting where they placed a pod)
call :meth:`NodeIndex.upsert`, :meth:`NodeIndex.delete`, :meth:`NodeIndex.replace_all` and
:meth:`NodeIndex.note_placed`. Readers (request threads) call :meth:`NodeIndex.decisions` for a
pod's ``(snapshot, workload)``: a :class:`Memo` that holds, for every node in the view, the answer's
JSON pieces (``{"Host":..,"Score":..}`` for prioritize, ``Memo.keeps``/``Memo.fails`` for filter),
so that a request is dict lookups and a join of bytes.

Incremental. A memo is filled once, on the first request for its key, then kept current by the
writers: a changed node recomputes its own decision in each memo, and the cluster-wide terms it
contributes to are compared before and after, so that only the decisions they reach are redone:

- a node's own change (tiers, queue, facts): that node, in every memo;
- a snapshot's holder count (an add or an evict of it): that build's holders, whose spread damping
  reads ``holders / nodes``, in that snapshot's memo only;
- the node count (a node added or removed): every build's holders (the same damping);
- the set of known facts (a compat key appears or goes): the nodes with GPU-label facts only;
- the nodes' reported fetch throughput, whose median (on a grid: ``scoring.cluster_fetch_bps``) is
  every fetch estimate: when it moves a step (rarely: ~9% steps), every node;
- a build of the snapshot appearing or going, or its size changing: the nodes of that build's
  facts, and those with GPU-label facts; the whole memo only when the largest build's size moves
  (every node's cold-start estimate reads it) or the first build appears or the last one goes.

The decisions are computed on the writer's thread, not in the request path: a request never waits
for a recomputation, and a busy cluster's annotation churn costs the writer a few microseconds per
update and memo. A long recomputation (a new holder of a widely held snapshot redoes its holders)
lets other threads run every ``YIELD_EVERY`` nodes, so a request waits for at most that many.

Kept node lists. kube-scheduler asks about the same feasible nodes pod after pod, so each memo keeps
the answers for the last ``VIEWS`` node lists it was asked about (:class:`View`, keyed by the
request's NodeNames bytes) and a log of the nodes whose pieces changed: a request whose list is
kept is a comparison of bytes and, if the memo changed since, a patch of those nodes' positions and
a join. Only a new list costs a lookup per node.

Placed pods. The agents' ``restoring`` counts reach the extender up to one pass (30 s) late, so a
burst of replicas would see every holder idle and pile onto the best one. The extender therefore
counts the Thaw pods it placed, from its own answers (no watch of pods: the webhook marks Thaw pods
with annotations, which a watch cannot select, and a burst's next pod is scored before the last
one's bind is even sent): for each prioritize answer, the nodes it scored highest, 1/k on each of
k tied ones (kube-scheduler breaks ties at random, so each is as likely; a guess of one would count
the pod where it did not go and push the next pods to where it did); for a filter that leaves one
node (kube-scheduler then skips prioritize), that node. A pod counts as a restore in progress there
for ``Params.placed_window_s``; the queue a decision uses is the larger of the node's reported
``restoring`` and that count (not the sum: once the agent reports, it counts the same restores; the
larger undercounts a node that already reported restores of other pods). The guess can be wrong
where kube-scheduler's own plugins outweigh the extender's difference; the agents' report corrects
it within a pass. Asked again about the same pod (a retry), the new answer replaces the old. A
count reaches the decisions in steps of ``PLACED_STEP`` and is not spread over more than
``PLACED_TIES`` nodes, so that noting a pod redoes a few nodes, not every tied one.

Memory. Per memo, about 0.12 KB per node of answers, and up to 0.35 KB more for its two kept node
lists (``VIEWS``): 2.2 MiB at 5,000 nodes, measured. Memos are kept while their total stays under
``MEMO_ENTRIES`` node answers (least recently used dropped first), and at most ``MEMO_KEYS``: at
most ~70 MiB, whatever the number of snapshots or nodes.
Warnings about unreadable annotations are remembered per node as one hash (not the text), so
annotation churn leaves nothing behind. Placed pods are kept at most ``PLACED_MAX``.

Thread safety: writers hold ``_lock``; readers take no lock on the index (a memo's ``view_lock``
guards only its kept lists). Under the GIL single dict operations are atomic, readers never iterate
the shared dicts (a bucket is copied or intersected in one step), a writer replaces an entry
before it removes the old one, and a reader that races a write answers from a view at most one
event old, which is what a watch-fed cache gives anyway.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from extender.nodes import NodeEntry, NodeError, parse_node
from extender.scoring import (
    DEFAULT_PARAMS,
    MAX_SCORE,
    Decision,
    Params,
    Variant,
    cluster_fetch_bps,
    decide,
    restore_seconds,
    score_of,
    spread_factor,
)

log = logging.getLogger(__name__)

# Node answers kept over all memos (~0.45 KB each with the views: ~70 MiB at most), and memos at
# most: a 5,000-node cluster keeps 32 snapshots' answers, a 500-node one 64.
MEMO_ENTRIES = 160_000
MEMO_KEYS = 64
# Pods whose placement is remembered (those of the last placed_window_s; the oldest go first).
PLACED_MAX = 50_000
# A pod is counted on at most this many tied nodes (Memo.top), and a node's count reaches its
# decisions in steps of PLACED_STEP: a pod spread over k nodes moves each by 1/k, and redoing k
# nodes' decisions for each such pod would cost more than the scores it could move.
PLACED_TIES = 64
PLACED_STEP = 0.25
UNKNOWN_REASON = "not in the extender's node view (Node not seen by its watch yet)"
# Decisions a writer computes before it lets request threads run (time.sleep(0) releases the GIL):
# ~0.2 ms of work, against the interpreter's 5 ms switch interval.
YIELD_EVERY = 32
# Node lists whose answers a memo keeps (Memo.answer): a pod's filter and prioritize lists.
VIEWS = 2

Key = tuple[str, str]  # (snapshot, workload)


def failure_message(snapshot: str, reason: str) -> str:
    return f"thaw: cannot restore snapshot {snapshot}: {reason}"


def _positions(names: list[str]) -> dict[str, int | list[int]]:
    """name -> its position in ``names`` (a list of them for a name asked more than once)."""
    pos: dict[str, int | list[int]] = {name: i for i, name in enumerate(names)}
    if len(pos) != len(names):
        seen: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            seen.setdefault(name, []).append(i)
        pos.update({name: at for name, at in seen.items() if len(at) > 1})
    return pos


@dataclass(slots=True, eq=False)
class View:
    """One node list as requests send it (kube-scheduler asks about the same feasible nodes for pod
    after pod), with the memo's pieces at each position: an answer is a join of them, and a memo
    change patches the positions of the nodes it changed, not the whole list."""

    raw: bytes  # the request's NodeNames, as sent: the key
    names: list[str]
    seq: int  # the memo's change count the pieces are current with
    frags: list[bytes | None]  # prioritize: the fragment, None for nodes that score 0
    keeps: list[bytes | None]  # filter: the JSON name of a node that can restore
    fails: list[tuple[bytes, bytes] | None]  # filter: (FailedNodes pair, unresolvable pair or b"")
    pos: dict[str, int | list[int]] | None = None  # name -> position(s), built on first use
    out: dict[str, bytes] = field(default_factory=dict)  # verb -> answer at seq
    one: str | None = None  # filter: the one node it keeps, if it keeps one (set by its render)


@dataclass(slots=True, eq=False)
class Memo:
    """The answers' pieces for one (snapshot, workload), one entry per node in the view."""

    snapshot: str
    workload: str
    index: NodeIndex
    variants: dict[str, Variant]
    known_facts: dict[str, dict[str, str | int]]
    node_count: int
    cluster_fetch: float | None  # the nodes' measured fetch throughput (their reports' median)
    # name -> b'{"Host":"name","Score":N}', the prioritize answer's element, ready to join; only
    # nodes that score above 0 (the answer lists only those: handlers.prioritize).
    fragments: dict[str, bytes] = field(default_factory=dict)
    # The filter answer's pieces (placement: required), by whether the node can restore: the node's
    # JSON name for NodeNames, or ('"name":"reason"' for FailedNodes, the same pair or b"" for
    # FailedAndUnresolvableNodes: not for nodes the view does not know, the watch may catch up).
    keeps: dict[str, bytes] = field(default_factory=dict)
    fails: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    # by_score[s]: the nodes that score s (1..10), to name the best node of an answer.
    by_score: list[set[str]] = field(default_factory=lambda: [set() for _ in range(MAX_SCORE + 1)])
    # Local hits: name -> (estimated seconds, cold seconds, the build's compat key), to redo their
    # score alone when only the spread damping moves (_respread).
    local: dict[str, tuple[float, float, str]] = field(default_factory=dict)
    used: float = 0.0  # monotonic time of the last request, for least-recently-used eviction
    # Changes to the pieces: a count, and (the count at the log's start, the names changed since).
    seq: int = 0
    log: tuple[int, list[str]] = field(default_factory=lambda: (0, []))
    # The last node lists asked about, the latest first (requests hold view_lock): a pod's filter
    # and prioritize lists differ when the filter took nodes out.
    views: list[View] = field(default_factory=list)
    view_lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, node: NodeEntry) -> Decision:
        """The decision for ``node`` under this memo's cluster-wide terms."""
        return decide(
            self.snapshot,
            self.workload,
            node,
            variants=self.variants,
            known_facts=self.known_facts,
            node_count=self.node_count,
            cluster_fetch=self.cluster_fetch,
            p=self.index.params,
        )

    def decision(self, name: str) -> Decision:
        """The decision for the node called ``name`` as the view has it now (computed, not kept)."""
        node = self.index.effective(name)
        if node is None:
            return Decision("cold", 0.0, 0.0, 0, False, UNKNOWN_REASON)
        return self.decide(node)

    def unknown(self, name: str) -> tuple[bytes, bytes]:
        """The FailedNodes pair for a name the view does not know (never unresolvable: the watch may
        catch up; never kept: requests may make names up)."""
        return orjson.dumps(name) + b":" + orjson.dumps(failure_message(self.snapshot, UNKNOWN_REASON)), b""

    def verdict(self, name: str) -> tuple[bytes, bytes, bytes]:
        """(keep, failed, unresolvable) pieces for one node, each b"" where it does not apply."""
        keep = self.keeps.get(name)
        if keep is not None:
            return keep, b"", b""
        fail = self.fails.get(name) or self.unknown(name)
        return b"", fail[0], fail[1]

    def top(self, names: list[str], raw: bytes = b"", limit: int = PLACED_TIES) -> list[str]:
        """The nodes among ``names`` (sent as ``raw``) that score highest, above 0 (sorted); none
        when more than ``limit`` tie (a pod's 1/k on each would move no score, and kube-scheduler
        spreads such ties itself)."""
        asked: Any = None  # a container of the names asked about
        if raw:
            with self.view_lock:
                v = self._kept(raw)
                if v is not None:
                    v.pos = v.pos if v.pos is not None else _positions(v.names)
                    asked = v.pos.keys()
        if asked is None:
            asked = set(names)
        for bucket in reversed(self.by_score[1:]):
            if not bucket:
                continue
            if len(bucket) > limit:  # count the asked ones, up to limit + 1, before listing them
                found = sum(1 for _ in itertools.islice(filter(asked.__contains__, list(bucket)), limit + 1))
                if found > limit:
                    return []
                if not found:
                    continue
            hits = bucket & asked  # one step in C (iterates the smaller), as writers change buckets
            if hits:
                return sorted(hits)
        return []

    # ---- the last node lists (request threads) ---------------------------------------------------
    def answer(
        self, raw: bytes, names: list[str], verb: str, render: Callable[[View], bytes]
    ) -> tuple[bytes, str | None]:
        """``render(view)`` for the node list ``names`` (sent as ``raw``), from the view kept for
        that list: reused when the list and the memo are unchanged, patched where the memo changed,
        built for a list not kept (the oldest of VIEWS goes). With the view's ``one``. ``verb``
        is "filter" (its answer reads ``keeps``/``fails``) or "prioritize" (``frags``): a patch
        drops only the answers whose pieces it changed."""
        with self.view_lock:
            v = self._kept(raw)
            if v is None:
                v = self._view(raw, names)
                self.views = [v, *self.views[: VIEWS - 1]]
            elif v.seq != self.seq:
                self._patch(v)
            out = v.out.get(verb)
            if out is None:
                out = v.out[verb] = render(v)
            return out, v.one

    def _kept(self, raw: bytes) -> View | None:
        """The kept view of this node list, moved to the front (view_lock held)."""
        for i, v in enumerate(self.views):
            if v.raw == raw:  # a memcmp; lists of other lengths differ at once
                if i:
                    self.views.insert(0, self.views.pop(i))
                return v
        return None

    def _view(self, raw: bytes, names: list[str]) -> View:
        seq = self.seq
        keeps = list(map(self.keeps.get, names))
        fails: list[tuple[bytes, bytes] | None] = list(map(self.fails.get, names))
        if len(list(filter(None, keeps))) + len(list(filter(None, fails))) != len(names):
            for i, (name, k, f) in enumerate(zip(names, keeps, fails, strict=True)):
                if k is None and f is None:
                    fails[i] = self.unknown(name)
        return View(raw, names, seq, list(map(self.fragments.get, names)), keeps, fails)

    def _patch(self, v: View) -> None:
        seq = self.seq
        base, log = self.log
        if v.seq < base or seq - v.seq > max(16, len(v.names) // 16):  # too much changed: rebuild
            fresh = self._view(v.raw, v.names)
            v.seq, v.frags, v.keeps, v.fails, v.pos = fresh.seq, fresh.frags, fresh.keeps, fresh.fails, None
            v.out.clear()
            v.one = None
            return
        if v.pos is None:
            v.pos = _positions(v.names)
        frags_moved = verdicts_moved = False
        for name in set(log[v.seq - base : seq - base]):
            at = v.pos.get(name)
            if at is None:
                continue
            frag = self.fragments.get(name)
            keep = self.keeps.get(name)
            fail = None if keep is not None else self.fails.get(name) or self.unknown(name)
            for i in at if isinstance(at, list) else (at,):
                frags_moved |= v.frags[i] != frag
                verdicts_moved |= v.keeps[i] != keep or v.fails[i] != fail
                v.frags[i], v.keeps[i], v.fails[i] = frag, keep, fail
        v.seq = seq
        # Most changes move a score, not whether a node can restore: the filter answer stays.
        if frags_moved:
            v.out.pop("prioritize", None)
        if verdicts_moved:
            v.out.pop("filter", None)
            v.one = None

    # ---- writers (the index holds its lock) ------------------------------------------------------
    def _changed(self, name: str) -> None:
        base, log = self.log
        if len(log) >= 4096:  # start a new log; views older than it rebuild
            base, log = base + len(log), []
        log.append(name)
        self.log = (base, log)
        self.seq += 1

    def _set(self, name: str, d: Decision, compat: str | None = None) -> None:
        if d.tier in ("memory", "disk") and compat is not None:  # a local hit: see _respread
            self.local[name] = (d.seconds, d.cold_seconds, compat)
        else:
            self.local.pop(name, None)
        self._piece(name, d.score, d.restorable, d.reason)

    def _respread(self, compats: Iterable[str]) -> None:
        """The holders of these builds again, after their holder count or the node count moved:
        only their spread damping did, so their score is redone from the estimate kept in
        ``local`` (no decision recomputed; the pieces of a local hit carry no reason)."""
        index = self.index
        p = index.params
        for compat in compats:
            variant = self.variants.get(compat)
            if variant is None:
                continue
            best = restore_seconds(variant.bytes, "memory", p)
            spread = spread_factor(variant.holders, self.node_count, p)
            for name in list(index._holders.get((self.snapshot, self.workload, compat), ())):
                kept = self.local.get(name)
                if kept is not None and kept[2] == compat:
                    self._piece(name, score_of(kept[0], kept[1], best, spread), True, "")

    def _piece(self, name: str, score: int, restorable: bool, reason: str) -> None:
        # Each dict entry is replaced in one step, the new one before the old goes: a request that
        # reads meanwhile finds the node in one dict or both, never in neither (which reads as a
        # node the view does not know).
        key = self.index.name_json[name]
        frag = b'{"Host":%b,"Score":%d}' % (key, score) if score > 0 else None
        if restorable:
            keep, fail = key, None
        else:
            pair = key + b":" + orjson.dumps(failure_message(self.snapshot, reason))
            keep, fail = None, (pair, pair)
        old_frag = self.fragments.get(name)
        if frag == old_frag and keep == self.keeps.get(name) and fail == self.fails.get(name):
            return
        if frag != old_frag:
            for bucket in self.by_score:
                bucket.discard(name)
            if frag is None:
                del self.fragments[name]
            else:
                self.fragments[name] = frag
                self.by_score[score].add(name)
        if keep is not None:
            self.keeps[name] = keep
            self.fails.pop(name, None)
        else:
            assert fail is not None
            self.fails[name] = fail
            self.keeps.pop(name, None)
        self._changed(name)

    def _drop(self, name: str) -> None:
        self.local.pop(name, None)
        found = self.fragments.pop(name, None) is not None
        if found:
            for bucket in self.by_score:
                bucket.discard(name)
        if self.keeps.pop(name, None) is not None or self.fails.pop(name, None) is not None or found:
            self._changed(name)

    def _refresh(self, names: Iterable[str]) -> None:
        index = self.index
        for i, name in enumerate(names, 1):
            node = index.effective(name)
            if node is None:
                self._drop(name)
            else:
                self._set(name, self.decide(node), node.compat)
            if i % YIELD_EVERY == 0:
                time.sleep(0)

    def _fill(self) -> None:
        """Every node's pieces again, each replaced in place (requests meanwhile read old or new)."""
        nodes = self.index.nodes
        self._refresh(list(nodes))
        for name in [n for n in (*self.fragments, *self.keeps, *self.fails) if n not in nodes]:
            self._drop(name)
        self.seq += 1
        self.log = (self.seq, [])  # every view rebuilds


class NodeIndex:
    def __init__(self, params: Params = DEFAULT_PARAMS) -> None:
        self.params = params
        self._lock = threading.Lock()
        self.nodes: dict[str, NodeEntry] = {}
        # (snapshot, workload, compat) -> {node name: bytes}: who holds which compatible build.
        self._holders: dict[tuple[str, str, str], dict[str, int]] = {}
        # (snapshot, workload) -> set of compat keys with at least one holder.
        self._variant_keys: dict[Key, set[str]] = {}
        # compat key -> (flattened facts, number of nodes with that key).
        self._facts: dict[str, tuple[dict[str, str | int], int]] = {}
        self._partial: set[str] = set()  # nodes with GPU-label facts only
        self._by_compat: dict[str, set[str]] = {}  # compat key -> the nodes with those facts
        # Reported fetch throughput per node; cluster_fetch is their median (every fetch estimate).
        self._fetch_reports: dict[str, float] = {}
        self.cluster_fetch: float | None = None
        self._memo: dict[Key, Memo] = {}
        # node -> hash of the problems last logged for it (and the inputs they came from).
        self._logged: dict[str, int] = {}
        # Placed pods: pod -> (its nodes, when); in time order; per node the count (a pod placed
        # on one of k tied nodes counts 1/k on each).
        self._placed_pod: dict[str, tuple[tuple[str, ...], float]] = {}
        self._placed_q: deque[tuple[float, str, tuple[str, ...]]] = deque()
        self.placed_on: dict[str, float] = {}
        # What the decisions use: placed_on rounded down to PLACED_STEP (1 exactly from 1 - 1e-9).
        self._applied: dict[str, float] = {}
        # Readiness: set after the first full list; last_sync is when the view was last known current.
        self.synced = False
        self.last_sync = 0.0
        self.resource_version = ""
        # name -> orjson-encoded name, for answers' pieces.
        self.name_json: dict[str, bytes] = {}

    def effective(self, name: str) -> NodeEntry | None:
        """The node as decisions read it: its restore queue is the larger of what its agent reported
        and the Thaw pods placed on it in the last ``placed_window_s``."""
        e = self.nodes.get(name)
        if e is None:
            return None
        placed = self._applied.get(name, 0.0)
        return e if placed <= e.restoring else dataclasses.replace(e, restoring=placed)

    # ---- writers: the structures -----------------------------------------------------------------
    def _add(self, e: NodeEntry) -> None:
        self.nodes[e.name] = e
        self.name_json[e.name] = orjson.dumps(e.name)
        for c in e.copies:
            self._holders.setdefault((c.name, c.workload, c.compat), {})[e.name] = c.bytes
            self._variant_keys.setdefault((c.name, c.workload), set()).add(c.compat)
        if e.compat is not None:
            flat, n = self._facts.get(e.compat, (e.flat_facts, 0))
            self._facts[e.compat] = (flat, n + 1)
            self._by_compat.setdefault(e.compat, set()).add(e.name)
        if e.partial:
            self._partial.add(e.name)
        if e.fetch_bps:
            self._fetch_reports[e.name] = e.fetch_bps

    def _remove(self, e: NodeEntry) -> None:
        self.nodes.pop(e.name, None)
        self._partial.discard(e.name)
        self._fetch_reports.pop(e.name, None)
        for c in e.copies:
            key = (c.name, c.workload, c.compat)
            holders = self._holders.get(key)
            if holders is not None:
                holders.pop(e.name, None)
                if not holders:
                    del self._holders[key]
                    keys = self._variant_keys.get((c.name, c.workload))
                    if keys is not None:
                        keys.discard(c.compat)
                        if not keys:
                            del self._variant_keys[(c.name, c.workload)]
        if e.compat is not None and e.compat in self._facts:
            flat, n = self._facts[e.compat]
            if n <= 1:
                del self._facts[e.compat]
            else:
                self._facts[e.compat] = (flat, n - 1)
        same = self._by_compat.get(e.compat or "")
        if same is not None:
            same.discard(e.name)
            if not same:
                del self._by_compat[e.compat or ""]

    def _variants(self, key: Key) -> dict[str, Variant]:
        out: dict[str, Variant] = {}
        for compat in self._variant_keys.get(key, ()):
            holders = self._holders[(key[0], key[1], compat)]
            out[compat] = Variant(max(holders.values()), len(holders))
        return out

    def _known_facts(self) -> dict[str, dict[str, str | int]]:
        return {k: flat for k, (flat, _) in self._facts.items()}

    def _log_problems(self, e: NodeEntry) -> None:
        # Once per node and value: only a hash is kept, and only the latest, so a node whose
        # annotation keeps changing leaves one int behind, not every text it ever had.
        if not e.problems:
            self._logged.pop(e.name, None)
            return
        mark = hash(repr((e.source, e.problems)))  # repr: a --nodes file may hold non-strings
        if self._logged.get(e.name) != mark:
            self._logged[e.name] = mark
            for problem in e.problems:
                log.warning("node %s: %s", e.name, problem)

    # ---- writers: the memos ----------------------------------------------------------------------
    def _change(self, old: NodeEntry | None, new: NodeEntry | None) -> None:
        """Apply one node's change to the structures and to every memo (the lock is held)."""
        name = new.name if new is not None else old.name if old is not None else ""
        facts_before = set(self._facts)
        if old is not None:
            self._remove(old)
        if new is not None:
            self._add(new)
            self._log_problems(new)
        else:
            self.name_json.pop(name, None)
            self._logged.pop(name, None)
        fetch_before = self.cluster_fetch
        if (old.fetch_bps if old else None) != (new.fetch_bps if new else None):
            self.cluster_fetch = cluster_fetch_bps(self._fetch_reports.values())
        fetch_moved = self.cluster_fetch != fetch_before
        if not self._memo:
            return
        count_moved = (old is None) != (new is None)
        facts_moved = set(self._facts) != facts_before
        touched: set[Key] = set()
        if old is not None:
            touched |= {(c.name, c.workload) for c in old.copies}
        if new is not None:
            touched |= {(c.name, c.workload) for c in new.copies}
        known = self._known_facts() if facts_moved else None
        for key, memo in list(self._memo.items()):
            redo: set[str] = {name}
            spread_of: set[str] = set()  # compat keys whose holders' spread damping moved
            if fetch_moved:
                memo.cluster_fetch = self.cluster_fetch
                redo |= set(self.nodes)
            if key in touched:
                variants = self._variants(key)
                if variants != memo.variants:
                    before = memo.variants
                    memo.variants = variants
                    largest = max((v.bytes for v in variants.values()), default=0)
                    if not before or not variants or largest != max(v.bytes for v in before.values()):
                        memo.node_count = len(self.nodes)
                        if known is not None:
                            memo.known_facts = known
                        memo._fill()
                        continue
                    builds = {
                        k
                        for k in set(variants) | set(before)
                        if k not in variants or k not in before or variants[k].bytes != before[k].bytes
                    }
                    for k in builds:  # their nodes' fetch estimates; GPU-label nodes match builds
                        redo |= self._by_compat.get(k, set())
                    if builds:
                        redo |= self._partial
                    spread_of |= {
                        k for k in variants if k in before and variants[k].holders != before[k].holders
                    }
            if count_moved:
                memo.node_count = len(self.nodes)
                spread_of |= set(memo.variants)
            if known is not None:
                memo.known_facts = known
                redo |= self._partial
            memo._refresh(redo)
            memo._respread(spread_of)

    def _refresh_nodes(self, names: Iterable[str]) -> None:
        """Recompute, in every memo, those of the given nodes whose placed count moved by a step
        (the lock is held)."""
        moved = []
        for name in names:
            placed = self.placed_on.get(name, 0.0)
            applied = math.floor(placed / PLACED_STEP + 1e-9) * PLACED_STEP
            if applied != self._applied.get(name, 0.0):
                if applied > 0:
                    self._applied[name] = applied
                else:
                    self._applied.pop(name, None)
                moved.append(name)
        for memo in list(self._memo.values()):
            memo._refresh(moved)

    def upsert(self, node: Mapping[str, Any]) -> bool:
        """Add or update a Node; returns whether anything the decisions read changed."""
        e = parse_node(node)
        with self._lock:
            old = self.nodes.get(e.name)
            if old is not None and old.source == e.source:
                old.resource_version = e.resource_version
                return False
            self._change(old, e)
            return True

    def delete(self, name: str) -> bool:
        with self._lock:
            old = self.nodes.get(name)
            if old is None:
                return False
            self._change(old, None)
            return True

    def replace_all(self, nodes: Iterable[Mapping[str, Any]], resource_version: str) -> int:
        """Replace the view with a full list; returns the number of Nodes that could not be read.

        Nodes whose inputs did not change are kept as they are; the others are applied one by one
        as the watch would, unless most of the view changed (a first list, a long outage): then the
        view is rebuilt and the memos are refilled on their next request.
        """
        entries: dict[str, NodeEntry] = {}
        bad = 0
        for node in nodes:
            try:
                e = parse_node(node)
            except NodeError as exc:
                bad += 1
                log.warning("skipping a Node in the list: %s", exc)
                continue
            entries[e.name] = e
        with self._lock:
            gone = [n for n in self.nodes if n not in entries]
            changed = [
                e for e in entries.values() if (o := self.nodes.get(e.name)) is None or o.source != e.source
            ]
            if len(gone) + len(changed) > max(16, len(entries) // 4):
                self.nodes = {}
                self.name_json = {}
                self._holders = {}
                self._variant_keys = {}
                self._facts = {}
                self._partial = set()
                self._by_compat = {}
                self._fetch_reports = {}
                self._memo.clear()
                self._logged = {n: h for n, h in self._logged.items() if n in entries}
                for e in entries.values():
                    self._add(e)
                    self._log_problems(e)
                self.cluster_fetch = cluster_fetch_bps(self._fetch_reports.values())
            else:
                for name in gone:
                    self._change(self.nodes[name], None)
                for e in changed:
                    self._change(self.nodes.get(e.name), e)
                for e in entries.values():
                    self.nodes[e.name].resource_version = e.resource_version
            self.resource_version = resource_version
            self.synced = True
            self.last_sync = time.monotonic()
        return bad

    def mark_current(self, resource_version: str | None = None) -> None:
        """The watch is connected and delivered everything up to ``resource_version``."""
        if resource_version:
            self.resource_version = resource_version
        self.last_sync = time.monotonic()

    # ---- placed pods -----------------------------------------------------------------------------
    def note_placed(self, pod: str, nodes: Iterable[str], now: float | None = None) -> None:
        """Count ``pod`` as restoring on one of ``nodes`` from ``now``: 1/len(nodes) on each (the
        module docstring). Noted again, a pod's count moves; it does not add up."""
        window = self.params.placed_window_s
        on = (nodes,) if isinstance(nodes, str) else tuple(nodes)
        if window <= 0 or not on or len(on) > PLACED_TIES:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            moved = self._expire(now)
            prev = self._placed_pod.get(pod)
            if prev is not None:
                moved |= self._unplace(prev[0])
            self._placed_pod[pod] = (on, now)
            self._placed_q.append((now, pod, on))
            for node in on:
                self.placed_on[node] = self.placed_on.get(node, 0.0) + 1 / len(on)
            moved |= set(on)
            while len(self._placed_pod) > PLACED_MAX:  # keep the newest
                moved |= self._expire(self._placed_q[0][0] + window)
            self._refresh_nodes(moved)

    def expire_placed(self, now: float | None = None) -> None:
        """Forget placements older than the window (called on every request; cheap when none are)."""
        q = self._placed_q
        now = time.monotonic() if now is None else now
        if q and q[0][0] <= now - self.params.placed_window_s:
            with self._lock:
                self._refresh_nodes(self._expire(now))

    def _unplace(self, on: tuple[str, ...]) -> set[str]:
        for node in on:
            n = self.placed_on.get(node, 0.0) - 1 / len(on)
            if n > 1e-9:
                self.placed_on[node] = n
            else:
                self.placed_on.pop(node, None)
        return set(on)

    def _expire(self, now: float) -> set[str]:
        moved: set[str] = set()
        limit = now - self.params.placed_window_s
        q = self._placed_q
        while q and q[0][0] <= limit:
            t, pod, on = q.popleft()
            if self._placed_pod.get(pod) == (on, t):  # not replaced by a later answer
                del self._placed_pod[pod]
                moved |= self._unplace(on)
        return moved

    # ---- readers ---------------------------------------------------------------------------------
    def decisions(self, snapshot: str, workload: str) -> Memo:
        self.expire_placed()
        key = (snapshot, workload)
        memo = self._memo.get(key)
        if memo is None:
            with self._lock:
                memo = self._memo.get(key)
                if memo is None:
                    memo = self._new_memo(key)
        memo.used = time.monotonic()
        return memo

    def _new_memo(self, key: Key) -> Memo:
        memo = Memo(
            key[0],
            key[1],
            self,
            self._variants(key),
            self._known_facts(),
            len(self.nodes),
            self.cluster_fetch,
        )
        memo._fill()
        keep = max(1, min(MEMO_KEYS, MEMO_ENTRIES // max(1, len(self.nodes)))) - 1
        if len(self._memo) > keep:
            for old in sorted(self._memo, key=lambda k: self._memo[k].used)[: len(self._memo) - keep]:
                del self._memo[old]
        self._memo[key] = memo
        return memo
