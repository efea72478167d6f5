"""The extender protocol (``k8s.io/kube-scheduler/extender/v1``) over a :class:`NodeIndex`.

Bytes in, (HTTP status, bytes out): no Flask here, so tests and benchmarks call it directly.

- ``filter``: ``placement: preferred`` (the default) and pods that are not Thaw's pass every node.
  ``placement: required`` fails each node that cannot restore the snapshot, with the reason, in
  ``FailedNodes`` and, because preempting pods cannot make a node's GPU or driver match,
  also in ``FailedAndUnresolvableNodes`` (the scheduler reads that map first and then skips
  preemption for those nodes; older schedulers read only ``FailedNodes``).
- ``prioritize``: ``[{"Host", "Score"}]`` with 0..10 from :func:`extender.scoring.decide`; 0
  everywhere for pods that are not Thaw's.
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
from dataclasses import dataclass
from typing import Any

import orjson

from extender.index import UNKNOWN_REASON, Memo, NodeIndex
from extender.nodes import NodeError, parse_node
from extender.scoring import Decision, decide
from thaw.annotations import WORKLOAD, AnnotationError, Placement, parse_spec

log = logging.getLogger("extender.decisions")


class BadRequest(ValueError):
    """Input the protocol does not allow; the message says what and what is expected."""


@dataclass(frozen=True, slots=True)
class Args:
    pod_ref: str  # namespace/name, for logs
    thaw: tuple[str, str, Placement] | None  # (snapshot, workload, placement) for Thaw pods
    names: list[str]
    nodes: dict[str, Any] | None  # the NodeList when the scheduler sent full Nodes
    items: list[dict[str, Any]] | None


def parse_args(body: bytes) -> Args:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest("ExtenderArgs must be a JSON object with Pod and Nodes or NodeNames")
    pod = doc.get("Pod")
    if not isinstance(pod, dict):
        raise BadRequest("ExtenderArgs.Pod is missing or not an object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise BadRequest("ExtenderArgs.Pod.metadata is missing or not an object")
    ann = meta.get("annotations") or {}
    if not isinstance(ann, dict):
        raise BadRequest("ExtenderArgs.Pod.metadata.annotations must be an object")
    pod_ref = f"{meta.get('namespace', '')}/{meta.get('name', meta.get('generateName', '?'))}"

    thaw: tuple[str, str, Placement] | None = None
    try:
        spec = parse_spec(ann)
    except AnnotationError as exc:
        raise BadRequest(f"pod {pod_ref}: {exc}") from None
    if spec is not None:
        workload = ann.get(WORKLOAD)
        if isinstance(workload, str) and workload:
            thaw = (spec.snapshot, workload, spec.placement)

    names_raw = doc.get("NodeNames")
    nodes_raw = doc.get("Nodes")
    if names_raw is not None:
        if nodes_raw is not None:
            raise BadRequest("ExtenderArgs has both Nodes and NodeNames; the scheduler sends one")
        if not isinstance(names_raw, list) or not all(isinstance(n, str) for n in names_raw):
            raise BadRequest("ExtenderArgs.NodeNames must be a list of strings")
        return Args(pod_ref, thaw, names_raw, None, None)
    if nodes_raw is None:
        raise BadRequest("ExtenderArgs has neither Nodes nor NodeNames")
    if not isinstance(nodes_raw, dict) or not isinstance(nodes_raw.get("items"), list):
        raise BadRequest("ExtenderArgs.Nodes must be a NodeList (an object with items)")
    items = nodes_raw["items"]
    names: list[str] = []
    for i, item in enumerate(items):
        name = (item.get("metadata") or {}).get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise BadRequest(f"ExtenderArgs.Nodes.items[{i}] has no metadata.name")
        names.append(name)
    return Args(pod_ref, thaw, names, nodes_raw, items)


def _decisions(index: NodeIndex, args: Args, memo: Memo) -> list[Decision]:
    """Decisions in input order; full Nodes the index has not seen are parsed from the request."""
    out: list[Decision] = []
    known = index.nodes
    for i, name in enumerate(args.names):
        if args.items is not None and name not in known:
            try:
                entry = parse_node(args.items[i])
            except NodeError:
                out.append(memo.decision(name))
                continue
            out.append(
                decide(
                    memo.snapshot,
                    memo.workload,
                    entry,
                    variants=memo.variants,
                    known_facts=memo.known_facts,
                    node_count=memo.node_count,
                    p=memo.params,
                )
            )
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


def filter_(index: NodeIndex, body: bytes) -> tuple[int, bytes]:
    try:
        args = parse_args(body)
    except BadRequest as exc:
        return 400, _error(str(exc))
    if args.thaw is None or args.thaw[2] != "required":
        # Filter nothing: the answer is the question's node set.
        if args.nodes is not None:
            return 200, orjson.dumps({"Nodes": args.nodes, "FailedNodes": {}, "Error": ""})
        return 200, orjson.dumps({"NodeNames": args.names, "FailedNodes": {}, "Error": ""})
    memo = index.decisions(args.thaw[0], args.thaw[1])
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
        failed[name] = f"thaw: cannot restore snapshot {args.thaw[0]}: {d.reason}"
        if d.reason != UNKNOWN_REASON:  # the watch may catch up: not unresolvable
            unresolvable[name] = failed[name]
    result: dict[str, Any] = {}
    if args.items is not None:
        nodes = args.nodes or {}
        result["Nodes"] = {
            "metadata": nodes.get("metadata") or {},
            "items": [args.items[i] for i in keep],
        }
    else:
        result["NodeNames"] = [args.names[i] for i in keep]
    result["FailedNodes"] = failed
    if unresolvable:
        result["FailedAndUnresolvableNodes"] = unresolvable
    result["Error"] = ""
    return 200, orjson.dumps(result)


def prioritize(index: NodeIndex, body: bytes) -> tuple[int, bytes]:
    try:
        args = parse_args(body)
    except BadRequest as exc:
        return 400, orjson.dumps({"Error": str(exc)})
    names = args.names
    if args.thaw is None:
        nj = index.name_json
        return 200, b"[" + b",".join(
            b'{"Host":%b,"Score":0}' % (nj.get(n) or orjson.dumps(n)) for n in names
        ) + b"]"
    memo = index.decisions(args.thaw[0], args.thaw[1])
    if args.items is None and not log.isEnabledFor(logging.DEBUG):
        # The hot path: one dict lookup per node, fragments precomputed.
        frags = memo.fragments
        return 200, b"[" + b",".join(frags.get(n) or memo.fragment(n) for n in names) + b"]"
    decisions = _decisions(index, args, memo)
    _log_decision("prioritize", args, decisions)
    return 200, orjson.dumps([{"Host": n, "Score": d.score} for n, d in zip(names, decisions, strict=True)])
