"""The extender protocol (``k8s.io/kube-scheduler/extender/v1``) over a :class:`NodeIndex`.

Bytes in, (HTTP status, bytes out): no Flask here, so tests and benchmarks call it directly.

- ``filter``: ``placement: preferred`` (the default) and pods that are not Thaw's pass every node.
  ``placement: required`` fails each node that cannot restore the snapshot, with the reason, in
  ``FailedNodes`` and, because preempting pods cannot make a node's GPU or driver match,
  also in ``FailedAndUnresolvableNodes`` (the scheduler reads that map first and then skips
  preemption for those nodes; older schedulers read only ``FailedNodes``).
- ``prioritize``: ``[{"Host", "Score"}]`` with 1..10 from :func:`extender.scoring.decide`, listing
  only the nodes that score above 0, in the order asked: kube-scheduler adds an extender's score
  only to the hosts its list names, so a host left out scores 0 from it (``prioritizeNodes`` in
  ``pkg/scheduler/schedule_one.go``: ``if score, ok := allNodeExtendersScores[name]; ok {
  ...TotalScore += score.TotalScore }``; older releases' ``generic_scheduler.go`` added
  ``combinedScores[name]``, a Go map whose missing keys read 0; ``HTTPExtender.Prioritize`` in
  ``pkg/scheduler/extender.go`` returns the decoded list as it is). ``[]`` for pods that are not
  Thaw's. Nodes that cannot restore score 0 and are left out, which makes the answer for a snapshot
  few nodes can restore much smaller.
- Both verbs note where a Thaw pod is likely to land, after the answer is sent (``*_deferred``):
  the nodes prioritize scored highest (1/k on each of k tied), or the one node a filter left (the
  scheduler then skips prioritize); :meth:`extender.index.NodeIndex.note_placed` counts it as a
  restore in progress there.
- The answer uses the mode of the question: ``NodeNames`` in, ``NodeNames`` out; ``Nodes`` in,
  ``Nodes`` out (the same objects, filtered). Never a node that was not in the input.
- Bad input gets 400 with the reason (in ``Error`` for filter, whose result has that field).

A Thaw pod carries ``thaw.dev/snapshot`` and the webhook's ``thaw.dev/workload``. A pod with the
first but not the second was not mutated (webhook down, ``failurePolicy: Ignore``): it cold-starts
without Thaw, so it is treated as any other pod.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from extender.index import UNKNOWN_REASON, Memo, NodeIndex, View, failure_message
from extender.nodes import NodeError, parse_node
from extender.scoring import Decision
from thaw.contract.annotations import WORKLOAD, AnnotationError, Placement, parse_spec

log = logging.getLogger("extender.decisions")


class BadRequest(ValueError):
    """Input the protocol does not allow; the message says what and what is expected."""


# The request is read with msgspec into raw pieces: the Pod (then parsed with orjson: it is small),
# the NodeList and each Node item as the bytes they came in, and of an item only metadata.name. A
# 5,000-Node body (~12 MB) then never becomes Python objects, and the answer passes the NodeList or
# the kept items through byte for byte: nothing re-encoded, exactly what the scheduler sent.
_NULL = msgspec.Raw(b"null")


class _Top(msgspec.Struct):
    Pod: msgspec.Raw
    Nodes: msgspec.Raw = _NULL
    NodeNames: msgspec.Raw = _NULL  # as sent: the key of the index's kept answers (Memo.answer)


class _NodeList(msgspec.Struct):
    items: list[msgspec.Raw]
    metadata: msgspec.Raw = _NULL


class _Meta(msgspec.Struct):
    name: str


class _Item(msgspec.Struct):
    metadata: _Meta


_top = msgspec.json.Decoder(_Top)
_names = msgspec.json.Decoder(list[str])
_node_list = msgspec.json.Decoder(_NodeList)
_item = msgspec.json.Decoder(_Item)
# How Go's encoding/json (kube-scheduler) writes every v1.Node: metadata first, name first in it.
_NAME_PREFIX = b'{"metadata":{"name":"'
_NAME_AT = len(_NAME_PREFIX)


def item_name(raw: msgspec.Raw) -> str:
    """metadata.name of one Node item ("" when it has none).

    Fast path for the layout the scheduler sends (a plain name right after the prefix, which with
    keys unique, as Go writes them, is the name); anything else is decoded properly.
    """
    view = memoryview(raw)
    if view[:_NAME_AT] == _NAME_PREFIX:
        head = bytes(view[_NAME_AT : _NAME_AT + 320])  # names are at most 253 characters
        end = head.find(b'"')
        if end > 0 and b"\\" not in head[:end] and head[end + 1 : end + 2] in (b",", b"}"):
            return head[:end].decode()
    try:
        return _item.decode(raw).metadata.name
    except msgspec.DecodeError:
        return ""


# (HTTP status, body, what to do once the answer is sent: note where the pod will land, or None).
Deferred = tuple[int, bytes, Callable[[], None] | None]


@dataclass(frozen=True, slots=True)
class Args:
    pod_ref: str  # namespace/name, for logs
    pod_key: str  # metadata.uid (namespace/name without one): which pod a placement is
    thaw: tuple[str, str, Placement] | None  # (snapshot, workload, placement) for Thaw pods
    names: list[str]
    names_raw: bytes = b""  # NodeNames as sent (names only)
    # When the scheduler sent full Nodes: the NodeList as received, its metadata and its items.
    node_list: msgspec.Raw | None = None
    list_meta: msgspec.Raw | None = None
    items: list[msgspec.Raw] | None = None

    def item(self, i: int) -> Any:
        """Node ``i`` as a dict (only for Nodes the index does not know: rare)."""
        assert self.items is not None
        return orjson.loads(memoryview(self.items[i]))


def _pod(pod: Any) -> tuple[str, str, tuple[str, str, Placement] | None]:
    if not isinstance(pod, dict):
        raise BadRequest("ExtenderArgs.Pod is missing or not an object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise BadRequest("ExtenderArgs.Pod.metadata is missing or not an object")
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict):
        raise BadRequest("ExtenderArgs.Pod.metadata.annotations must be an object")
    pod_ref = f"{meta.get('namespace', '')}/{meta.get('name', meta.get('generateName', '?'))}"
    uid = meta.get("uid")
    pod_key = uid if isinstance(uid, str) and uid else pod_ref
    try:
        spec = parse_spec(ann)
    except AnnotationError as exc:
        raise BadRequest(f"pod {pod_ref}: {exc}") from None
    if spec is not None:
        workload = ann.get(WORKLOAD)
        if isinstance(workload, str) and workload:
            return pod_ref, pod_key, (spec.snapshot, workload, spec.placement)
    return pod_ref, pod_key, None


def _explain(body: bytes) -> BadRequest:
    """Why ``body`` is not ExtenderArgs (the slow path, for bad input only): parse it generically."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return BadRequest(f"request body is not JSON: {exc}")
    if not isinstance(doc, dict):
        return BadRequest("ExtenderArgs must be a JSON object with Pod and Nodes or NodeNames")
    if not isinstance(doc.get("Pod"), dict):
        return BadRequest("ExtenderArgs.Pod is missing or not an object")
    names = doc.get("NodeNames")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
        return BadRequest("ExtenderArgs.NodeNames must be a list of strings")
    return BadRequest("ExtenderArgs.Nodes must be a NodeList (an object with items)")


def parse_args(body: bytes) -> Args:
    try:
        top = _top.decode(body)
    except msgspec.DecodeError:
        raise _explain(body) from None
    try:
        pod = orjson.loads(memoryview(top.Pod))
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"ExtenderArgs.Pod is not readable JSON: {exc}") from None
    pod_ref, pod_key, thaw = _pod(pod)
    nodes_null = top.Nodes == _NULL
    if top.NodeNames != _NULL:
        if not nodes_null:
            raise BadRequest("ExtenderArgs has both Nodes and NodeNames; the scheduler sends one")
        try:
            names = _names.decode(top.NodeNames)
        except msgspec.DecodeError:
            raise BadRequest("ExtenderArgs.NodeNames must be a list of strings") from None
        return Args(pod_ref, pod_key, thaw, names, bytes(top.NodeNames))
    if nodes_null:
        raise BadRequest("ExtenderArgs has neither Nodes nor NodeNames")
    try:
        node_list = _node_list.decode(top.Nodes)
    except msgspec.DecodeError:
        raise BadRequest("ExtenderArgs.Nodes must be a NodeList (an object with items)") from None
    items = node_list.items
    names = [item_name(raw) for raw in items]
    if not all(names):
        raise BadRequest(f"ExtenderArgs.Nodes.items[{names.index('')}] has no metadata.name")
    return Args(pod_ref, pod_key, thaw, names, b"", top.Nodes, node_list.metadata, items)


def _decisions(index: NodeIndex, args: Args, memo: Memo) -> list[Decision]:
    """Decisions in input order; full Nodes the index has not seen are parsed from the request."""
    out: list[Decision] = []
    known = index.nodes
    for i, name in enumerate(args.names):
        if args.items is not None and name not in known:
            try:
                entry = parse_node(args.item(i))
            except (NodeError, orjson.JSONDecodeError):
                out.append(memo.decision(name))
                continue
            out.append(memo.decide(entry))
        else:
            out.append(memo.decision(name))
    return out


def _log_decision(verb: str, args: Args, decisions: list[Decision]) -> None:
    if not log.isEnabledFor(logging.DEBUG) or args.thaw is None:
        return
    snapshot, workload, placement = args.thaw
    tiers = Counter(d.tier for d in decisions)
    ranked = sorted(range(len(decisions)), key=lambda i: -decisions[i].score)[:3]
    best = "; ".join(f"{args.names[i]} score {decisions[i].score}: {decisions[i].reason}" for i in ranked)
    log.debug(
        "%s pod %s snapshot=%s workload=%s placement=%s over %d nodes (%s): %s",
        verb,
        args.pod_ref,
        snapshot,
        workload[:12],
        placement,
        len(decisions),
        ", ".join(f"{n} {t}" for t, n in sorted(tiers.items())),
        best or "no nodes",
    )


def _error(message: str) -> bytes:
    return orjson.dumps({"FailedNodes": {}, "Error": message})


def _nodes_answer(args: Args, keep: list[int] | None) -> bytes:
    """``"Nodes":<NodeList>`` from the request's own bytes: all of it, or the items at ``keep``."""
    assert args.node_list is not None and args.items is not None
    if keep is None:  # the question's NodeList, as it came
        return b'"Nodes":' + bytes(args.node_list)
    items = args.items
    meta = args.list_meta
    # As the scheduler's own types have it: metadata is an object (null or absent reads as {}).
    meta_b = b"{}" if meta is None or meta == _NULL else bytes(meta)
    return b"".join(
        (b'"Nodes":{"metadata":', meta_b, b',"items":[', b",".join([items[i] for i in keep]), b"]}")
    )


def _placing(index: NodeIndex, args: Args, node: str | None) -> Callable[[], None] | None:
    """What to run once the answer is sent: count the pod on ``node`` (None: nothing to count)."""
    if node is None:
        return None
    return lambda: index.note_placed(args.pod_key, [node])


def filter_(index: NodeIndex, body: bytes) -> tuple[int, bytes]:
    """:func:`filter_deferred`, with its placement noted before it returns (tests, benchmarks)."""
    status, out, after = filter_deferred(index, body)
    if after is not None:
        after()
    return status, out


def filter_deferred(index: NodeIndex, body: bytes) -> Deferred:
    try:
        args = parse_args(body)
    except BadRequest as exc:
        return 400, _error(str(exc)), None
    if args.thaw is None or args.thaw[2] != "required":
        # Filter nothing: the answer is the question's node set.
        after = None
        if args.thaw is not None and len(args.names) == 1:  # the scheduler binds it without asking more
            memo = index.decisions(args.thaw[0], args.thaw[1])
            after = _placing(index, args, next(iter(memo.top(args.names)), None))
        if args.items is not None:
            return 200, b"".join((b"{", _nodes_answer(args, None), b',"FailedNodes":{},"Error":""}')), after
        return 200, orjson.dumps({"NodeNames": args.names, "FailedNodes": {}, "Error": ""}), after
    memo = index.decisions(args.thaw[0], args.thaw[1])
    names = args.names
    if log.isEnabledFor(logging.DEBUG) or (
        args.items is not None and not all(map(index.nodes.__contains__, names))
    ):
        out, left = _filter_slow(index, args, memo)
        return 200, out, _placing(index, args, left[0] if len(left) == 1 else None)
    if args.items is None:  # names: the answer from the memo's view of this node list
        out, one = memo.answer(args.names_raw, names, "filter", _render_filter)
        return 200, out, _placing(index, args, one)
    # Full Nodes the index knows: dict lookups at C speed, the answer's pieces precomputed (Memo).
    # A name in neither dict (one the view does not know) sends the request round the long way.
    flags = list(map(memo.keeps.get, names))
    fails = list(filter(None, map(memo.fails.get, names)))
    if sum(map(bool, flags)) + len(fails) != len(names):
        verdicts = [memo.verdict(n) for n in names]
        flags = [v[0] for v in verdicts]
        fails = [(v[1], v[2]) for v in verdicts if v[1]]
    keep = [i for i, k in enumerate(flags) if k]
    out = _filter_answer(_nodes_answer(args, keep), fails)
    return 200, out, _placing(index, args, names[keep[0]] if len(keep) == 1 else None)


def _filter_answer(kept: bytes, fails: list[tuple[bytes, bytes]]) -> bytes:
    """The filter answer around ``kept`` (its NodeNames or Nodes member): FailedNodes, the
    unresolvable ones where there are any, and an empty Error."""
    parts = [b"{", kept, b',"FailedNodes":{', b",".join([f[0] for f in fails]), b"}"]
    unresolvable = [f[1] for f in fails if f[1]]
    if unresolvable:
        parts += [b',"FailedAndUnresolvableNodes":{', b",".join(unresolvable), b"}"]
    parts.append(b',"Error":""}')
    return b"".join(parts)


def _render_filter(v: View) -> bytes:
    """The filter answer (names, placement: required) from a view's pieces."""
    keeps = list(filter(None, v.keeps))
    v.one = v.names[v.keeps.index(keeps[0])] if len(keeps) == 1 else None
    return _filter_answer(b'"NodeNames":[' + b",".join(keeps) + b"]", list(filter(None, v.fails)))


def _render_prioritize(v: View) -> bytes:
    """The prioritize answer from a view's pieces: the nodes that score above 0, in order."""
    return b"[" + b",".join(filter(None, v.frags)) + b"]"


def _filter_slow(index: NodeIndex, args: Args, memo: Memo) -> tuple[bytes, list[str]]:
    """Filter with a decision object per node: logs it, and reads Nodes the index does not know.
    The answer, and the names it keeps."""
    assert args.thaw is not None
    decisions = _decisions(index, args, memo)
    _log_decision("filter", args, decisions)
    failed: dict[str, str] = {}
    unresolvable: dict[str, str] = {}
    keep: list[int] = []
    for i, d in enumerate(decisions):
        if d.restorable:
            keep.append(i)
            continue
        name = args.names[i]
        failed[name] = failure_message(args.thaw[0], d.reason)
        if d.reason != UNKNOWN_REASON:  # the watch may catch up: not unresolvable
            unresolvable[name] = failed[name]
    if args.items is not None:
        kept = _nodes_answer(args, keep)
    else:
        kept = b'"NodeNames":' + orjson.dumps([args.names[i] for i in keep])
    rest: dict[str, Any] = {"FailedNodes": failed}
    if unresolvable:
        rest["FailedAndUnresolvableNodes"] = unresolvable
    rest["Error"] = ""
    return b"{" + kept + b"," + orjson.dumps(rest)[1:], [args.names[i] for i in keep]


def prioritize(index: NodeIndex, body: bytes) -> tuple[int, bytes]:
    """:func:`prioritize_deferred`, with its placement noted before it returns (tests, benchmarks)."""
    status, out, after = prioritize_deferred(index, body)
    if after is not None:
        after()
    return status, out


def prioritize_deferred(index: NodeIndex, body: bytes) -> Deferred:
    try:
        args = parse_args(body)
    except BadRequest as exc:
        return 400, orjson.dumps({"Error": str(exc)}), None
    if args.thaw is None:
        return 200, b"[]", None  # every node scores 0: none is listed (module docstring)
    memo = index.decisions(args.thaw[0], args.thaw[1])
    names = args.names
    if not log.isEnabledFor(logging.DEBUG) and (
        args.items is None or all(map(index.nodes.__contains__, names))
    ):
        # The hot path: one dict lookup per node (or the memo's view of this node list); nodes
        # scoring 0 (and names the view does not know) have no fragment and are left out.
        if args.items is None:
            out = memo.answer(args.names_raw, names, "prioritize", _render_prioritize)[0]
        else:
            out = b"[" + b",".join(list(filter(None, map(memo.fragments.get, names)))) + b"]"
        return 200, out, lambda: _place_best(index, args, memo)
    decisions = _decisions(index, args, memo)
    _log_decision("prioritize", args, decisions)
    scored = [(n, d.score) for n, d in zip(names, decisions, strict=True) if d.score > 0]
    out = orjson.dumps([{"Host": n, "Score": score} for n, score in scored])
    top = max((score for _, score in scored), default=0)
    best = sorted({n for n, score in scored if score == top and top > 0})
    return 200, out, (lambda: index.note_placed(args.pod_key, best)) if best else None


def _place_best(index: NodeIndex, args: Args, memo: Memo) -> None:
    index.note_placed(args.pod_key, memo.top(args.names, args.names_raw))
