"""The node index: every Node parsed once, and per-snapshot decisions memoised.

Writers (the watch thread, or a ``--nodes`` file at start) call :meth:`NodeIndex.upsert`,
:meth:`NodeIndex.delete` and :meth:`NodeIndex.replace_all`; each change drops exactly the memoised
decisions it can alter. Readers (request threads) call :meth:`NodeIndex.decisions` for a pod's
``(snapshot, workload)`` and look nodes up by name: a request costs O(nodes in the request), dict
lookups of values computed at most once per node between changes that concern it, with the
answer's JSON pieces (``{"Host":..,"Score":..}`` for prioritize, ``Memo.verdict`` for filter)
precomputed beside each decision, so an answer is a join of bytes.

Thread safety: writers hold ``_lock``; readers take no lock. Under the GIL single dict operations are
atomic, readers never iterate the shared dicts, and a reader that races a write answers from a view
at most one event old, which is what a watch-fed cache gives anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from extender.nodes import NodeEntry, NodeError, parse_node
from extender.scoring import DEFAULT_PARAMS, Decision, Params, Variant, decide

log = logging.getLogger(__name__)

# Distinct (snapshot, workload) pairs whose decisions are kept; a cluster runs far fewer models.
MEMO_KEYS = 256
UNKNOWN_REASON = "not in the extender's node view (Node not seen by its watch yet)"


def failure_message(snapshot: str, reason: str) -> str:
    return f"thaw: cannot restore snapshot {snapshot}: {reason}"


@dataclass(slots=True)
class Memo:
    """Decisions for one (snapshot, workload), filled lazily per node, dropped on changes."""

    snapshot: str
    workload: str
    variants: dict[str, Variant]
    known_facts: dict[str, dict[str, str | int]]
    node_count: int
    params: Params
    nodes: Mapping[str, NodeEntry]
    decisions: dict[str, Decision] = field(default_factory=dict)
    # name -> b'{"Host":"name","Score":N}', the prioritize answer's element, ready to join.
    fragments: dict[str, bytes] = field(default_factory=dict)
    # The filter answer's pieces (placement: required), by whether the node can restore: the node's
    # JSON name for NodeNames, or ('"name":"reason"' for FailedNodes, the same pair or b"" for
    # FailedAndUnresolvableNodes: not for nodes the view does not know, the watch may catch up).
    keeps: dict[str, bytes] = field(default_factory=dict)
    fails: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)

    def decide(self, node: NodeEntry) -> Decision:
        """The decision for ``node`` under this memo's cluster-wide terms (not memoised)."""
        return decide(
            self.snapshot,
            self.workload,
            node,
            variants=self.variants,
            known_facts=self.known_facts,
            node_count=self.node_count,
            p=self.params,
        )

    def decision(self, name: str) -> Decision:
        d = self.decisions.get(name)
        if d is None:
            node = self.nodes.get(name)
            d = Decision("cold", 0.0, 0.0, 0, False, UNKNOWN_REASON) if node is None else self.decide(node)
            # A writer may have replaced the node meanwhile and dropped its decisions: keep this
            # one only if it was computed from the entry that is still current. Names the view does
            # not know are not kept: a request must not grow the memo with names it made up.
            if node is not None and self.nodes.get(name) is node:
                self.decisions[name] = d
        return d

    def fragment(self, name: str) -> bytes:
        f = self.fragments.get(name)
        if f is None:
            node = self.nodes.get(name)
            f = b'{"Host":%b,"Score":%d}' % (orjson.dumps(name), self.decision(name).score)
            if node is not None and self.nodes.get(name) is node:
                self.fragments[name] = f
        return f

    def verdict(self, name: str) -> tuple[bytes, bytes, bytes]:
        """(keep, failed, unresolvable) pieces for one node, each b"" where it does not apply."""
        keep = self.keeps.get(name)
        if keep is not None:
            return keep, b"", b""
        fail = self.fails.get(name)
        if fail is not None:
            return b"", fail[0], fail[1]
        node = self.nodes.get(name)
        d = self.decision(name)
        key = orjson.dumps(name)
        current = node is not None and self.nodes.get(name) is node
        if d.restorable:
            if current:
                self.keeps[name] = key
            return key, b"", b""
        pair = key + b":" + orjson.dumps(failure_message(self.snapshot, d.reason))
        fail = (pair, pair if d.reason != UNKNOWN_REASON else b"")
        if current:
            self.fails[name] = fail
        return b"", fail[0], fail[1]


class NodeIndex:
    def __init__(self, params: Params = DEFAULT_PARAMS) -> None:
        self.params = params
        self._lock = threading.Lock()
        self.nodes: dict[str, NodeEntry] = {}
        # (snapshot, workload, compat) -> {node name: bytes}: who holds which compatible build.
        self._holders: dict[tuple[str, str, str], dict[str, int]] = {}
        # (snapshot, workload) -> set of compat keys with at least one holder.
        self._variant_keys: dict[tuple[str, str], set[str]] = {}
        # compat key -> (flattened facts, number of nodes with that key).
        self._facts: dict[str, tuple[dict[str, str | int], int]] = {}
        self._memo: OrderedDict[tuple[str, str], Memo] = OrderedDict()
        self._logged: set[tuple[str, str]] = set()
        # Readiness: set after the first full list; last_sync is when the view was last known current.
        self.synced = False
        self.last_sync = 0.0
        self.resource_version = ""
        # name -> orjson-encoded name, for answers about pods that are not Thaw's.
        self.name_json: dict[str, bytes] = {}

    # ---- writers -------------------------------------------------------------------------------
    def _add(self, e: NodeEntry) -> None:
        self.nodes[e.name] = e
        self.name_json[e.name] = orjson.dumps(e.name)
        for c in e.copies:
            self._holders.setdefault((c.name, c.workload, c.compat), {})[e.name] = c.bytes
            self._variant_keys.setdefault((c.name, c.workload), set()).add(c.compat)
        if e.compat is not None:
            flat, n = self._facts.get(e.compat, (e.flat_facts, 0))
            self._facts[e.compat] = (flat, n + 1)

    def _remove(self, e: NodeEntry) -> None:
        self.nodes.pop(e.name, None)
        self.name_json.pop(e.name, None)
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

    def _log_problems(self, e: NodeEntry) -> None:
        for problem in e.problems:
            # Once per node and value: upsert re-parses only when the inputs change.
            key = (e.name, f"{e.source!r}:{problem}")
            if key not in self._logged:
                self._logged.add(key)
                log.warning("node %s: %s", e.name, problem)

    def _invalidate(self, old: NodeEntry | None, new: NodeEntry | None) -> None:
        """Drop the memoised decisions a change of one node can alter (writers hold the lock).

        A node added or removed, or whose facts changed, moves the cluster-wide terms (node count,
        known facts): everything goes. Otherwise only (a) every decision about this node (its queue,
        its tiers) and (b) every decision for a snapshot whose set of holders changed.
        """
        if old is None or new is None or old.compat != new.compat or old.partial != new.partial:
            self._memo.clear()
            return
        name = new.name
        if old.copies != new.copies:
            changed = {(c.name, c.workload) for c in set(old.copies) ^ set(new.copies)}
            for key in changed:
                self._memo.pop(key, None)
        for memo in self._memo.values():
            memo.decisions.pop(name, None)
            memo.fragments.pop(name, None)
            memo.keeps.pop(name, None)
            memo.fails.pop(name, None)

    def upsert(self, node: Mapping[str, Any]) -> bool:
        """Add or update a Node; returns whether anything the decisions read changed."""
        e = parse_node(node)
        with self._lock:
            old = self.nodes.get(e.name)
            if old is not None and old.source == e.source:
                old.resource_version = e.resource_version
                return False
            if old is not None:
                self._remove(old)
            self._add(e)
            self._log_problems(e)
            self._invalidate(old, e)
            return True

    def delete(self, name: str) -> bool:
        with self._lock:
            old = self.nodes.get(name)
            if old is None:
                return False
            self._remove(old)
            self._invalidate(old, None)
            return True

    def replace_all(self, nodes: Iterable[Mapping[str, Any]], resource_version: str) -> int:
        """Replace the view with a full list; returns the number of Nodes that could not be read."""
        entries: list[NodeEntry] = []
        bad = 0
        for node in nodes:
            try:
                entries.append(parse_node(node))
            except NodeError as exc:
                bad += 1
                log.warning("skipping a Node in the list: %s", exc)
        with self._lock:
            self.nodes = {}
            self.name_json = {}
            self._holders = {}
            self._variant_keys = {}
            self._facts = {}
            for e in entries:
                self._add(e)
                self._log_problems(e)
            self._memo.clear()
            self.resource_version = resource_version
            self.synced = True
            self.last_sync = time.monotonic()
        return bad

    def mark_current(self, resource_version: str | None = None) -> None:
        """The watch is connected and delivered everything up to ``resource_version``."""
        if resource_version:
            self.resource_version = resource_version
        self.last_sync = time.monotonic()

    # ---- readers -------------------------------------------------------------------------------
    def decisions(self, snapshot: str, workload: str) -> Memo:
        key = (snapshot, workload)
        memo = self._memo.get(key)
        if memo is not None:
            return memo
        with self._lock:
            variants: dict[str, Variant] = {}
            for compat in self._variant_keys.get(key, ()):
                holders = self._holders[(snapshot, workload, compat)]
                variants[compat] = Variant(max(holders.values()), len(holders))
            known = {k: flat for k, (flat, _) in self._facts.items()}
            memo = Memo(snapshot, workload, variants, known, len(self.nodes), self.params, self.nodes)
            self._memo[key] = memo
            self._memo.move_to_end(key)
            while len(self._memo) > MEMO_KEYS:
                self._memo.popitem(last=False)
        return memo
