"""``thaw agent``: the node DaemonSet. Keeps the node cache healthy and tells the cluster what it holds.

Each pass: detect the node's facts (a driver or CRIU upgrade changes them), remove what dead
processes left (interrupted fetches, half-deleted snapshots), evict snapshots this node can no
longer restore, evict least recently used snapshots until the cache fits its byte budget (never one
that a restore holds), record the budget for ``thaw fetch``, and patch this Node's ``thaw.dev/facts``
and ``thaw.dev/cache`` annotations (JSON merge patch, this Node only, with the official client; the
cache's ``fetch`` field is the median throughput of the node's recent misses: thaw/node/fetchrate.py), and
post an Event on each Thaw pod of this node saying how it started and how its checkpoint went (from
the outcome copies in the cache, for the pods its own API list shows on this node: thaw/node/events.py).
The inventory lists only snapshots whose manifest signature verifies against the key recorded beside
them when Thaw staged them (and, with ``--trust DIR``, only keys in that directory).
Without ``--node`` it prints the annotations instead (a dry run for people and demos).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.canonical import canonical_json
from thaw.contract.facts import NodeFacts
from thaw.contract.inventory import Inventory, render_inventory
from thaw.contract.signing import TrustedKeys, load_trusted_keys
from thaw.errors import UsageError
from thaw.node.events import OUTCOME_MAX_AGE_S, PodRef, node_events, pod_ref, unverified_specs
from thaw.node.fetchrate import FetchSamples
from thaw.snapshot.cache import (
    clean_stale,
    enforce_budget,
    inventory,
    mark_in_use,
    remove_incompatible,
    write_budget,
)
from thaw.snapshot.outcome_copy import read_outcome_copies

log = logging.getLogger("thaw.agent")

RESYNC_S = 300.0  # patch even when nothing changed, in case someone removed the annotations
HTTP_CONFLICT = 409
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class PassResult:
    facts: NodeFacts
    inventory: Inventory
    stale: list[str] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)


def upkeep(
    cache_dir: Path,
    budget: int,
    facts: NodeFacts,
    trusted: TrustedKeys | None = None,
    fetches: FetchSamples | None = None,
) -> PassResult:
    """One pass over the cache (no cluster I/O). ``fetches``: the misses seen in earlier passes,
    fed this pass's outcome copies, for the inventory's ``fetch`` field."""
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_budget(cache_dir, budget)
    mark_in_use(cache_dir)  # restores hold snapshots through read-only mounts: their last use is now
    stale = clean_stale(cache_dir)
    incompatible = remove_incompatible(cache_dir, facts)
    evicted = enforce_budget(cache_dir, budget)
    inv = inventory(cache_dir, facts, budget, trusted=trusted)
    if fetches is not None:
        fetches.observe(read_outcome_copies(cache_dir, OUTCOME_MAX_AGE_S))
        rate = fetches.rate()
        if rate is not None:
            inv["fetch"] = rate
    return PassResult(facts, inv, stale, incompatible, evicted)


def node_annotations(facts: NodeFacts, inv: Inventory) -> dict[str, str]:
    """The two annotation values, each under the 64 KiB budget (render_inventory trims LRU-first)."""
    return {NODE_FACTS: canonical_json(facts).decode(), NODE_CACHE: render_inventory(inv)}


def core_api() -> Any:
    """A CoreV1Api from the in-cluster service account, else KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.CoreV1Api()


def node_pods(api: Any, node: str) -> dict[str, PodRef]:
    """This node's Thaw pods by uid, from the API (a list with ``spec.nodeName=<node>``; each pod
    checked again here, whatever a proxy did with the selector)."""
    resp = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={node}", _preload_content=False)
    items = orjson.loads(resp.data).get("items") or []
    refs = (pod_ref(p) for p in items if (p.get("spec") or {}).get("nodeName") == node)
    return {r["uid"]: r for r in refs if r is not None}


def post_events(api: Any, events: Iterable[dict[str, Any]], posted: set[str]) -> None:
    """Create the Events not yet posted (``posted`` remembers names across passes; one that exists
    already, 409, counts as posted). An API error other than 409 is logged and the Event tried again
    next pass."""
    from kubernetes.client.exceptions import ApiException

    for body in events:
        name = body["metadata"]["name"]
        if name in posted:
            continue
        try:
            api.create_namespaced_event(body["metadata"]["namespace"], body)
            log.info("event: %s", event_line(body))
        except ApiException as exc:
            if exc.status != HTTP_CONFLICT:
                log.warning("cannot post event %s: %s %s", name, exc.status, exc.reason)
                continue
        posted.add(name)


def event_line(body: dict[str, Any]) -> str:
    ref = body["involvedObject"]
    return f"{body['type']} {body['reason']} on pod {ref['namespace']}/{ref['name']}: {body['message']}"


def patch_node(api: Any, node: str, annotations: dict[str, str]) -> None:
    """Merge-patch ``annotations`` onto Node ``node``: other annotations and fields stay untouched."""
    api.patch_node(node, {"metadata": {"annotations": annotations}}, _content_type=MERGE_PATCH)


class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping after this pass", signum)
        self.event.set()


def run(args: argparse.Namespace) -> int:
    """``thaw agent --cache DIR --budget BYTES [--node NAME] [--facts FILE] [--interval S] [--once]``."""
    from thaw.snapshot.nodefacts import node_facts

    if args.budget < 0:
        raise UsageError(f"--budget must be a byte count >= 0, got {args.budget}")
    if args.interval <= 0:
        raise UsageError(f"--interval must be > 0 seconds, got {args.interval}")
    stop = _Stop()
    if not args.once:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    api = core_api() if args.node else None
    if api is not None:  # writes only where its admission policies are in force (thaw/node/policy.py)
        from thaw.node.policy import guard

        api = guard(api, bool(getattr(args, "allow_without_node_policy", False)), args.node)
    from thaw.node import metrics as agent_metrics

    metrics = agent_metrics.start(args, api)  # /metrics and /readyz on --metrics-port
    result: PassResult | None = None
    trust = getattr(args, "trust", None)
    posted: set[str] = set()
    fetches = FetchSamples()
    last_sent: dict[str, str] | None = None
    last_sent_at = 0.0
    failed = False
    while True:
        try:
            trusted = load_trusted_keys(trust) if trust is not None else None
            result = upkeep(args.cache, args.budget, node_facts(args.facts), trusted, fetches)
            for what, items in (
                ("removed leftover", result.stale),
                ("removed snapshot no longer compatible with this node", result.incompatible),
                ("evicted (over budget, least recently used)", result.evicted),
            ):
                for item in items:
                    log.info("%s: %s", what, item)
            annotations = node_annotations(result.facts, result.inventory)
            if api is None:
                sys.stdout.write(canonical_json(annotations).decode() + "\n")
                sys.stdout.flush()
            elif annotations != last_sent or time.monotonic() - last_sent_at > RESYNC_S:
                patch_node(api, args.node, annotations)
                last_sent, last_sent_at = annotations, time.monotonic()
                log.info(
                    "patched node %s: %d snapshot(s), %d bytes free",
                    args.node,
                    len(result.inventory["snapshots"]),
                    result.inventory["free_bytes"],
                )
            # How each Thaw pod on this node started, as Events on the pod (thaw/node/events.py).
            if api is not None:
                post_events(api, node_events(args.cache, args.node, node_pods(api, args.node)), posted)
            else:
                for uid, spec in unverified_specs(args.cache):
                    log.info(
                        "event (dry run, pod uid %s not checked against the API): %s %s: %s",
                        uid,
                        spec["type"],
                        spec["reason"],
                        spec["message"],
                    )
            failed = False
        except Exception as exc:
            # A transient API or disk error must not crash-loop the DaemonSet: log it, try again.
            failed = True
            log.error("agent pass failed: %s: %s", type(exc).__name__, exc)
            log.debug("agent pass failed", exc_info=True)
        if metrics is not None:
            metrics.after_pass(args.cache, None if failed else result, api)
        if args.heartbeat is not None:
            touch(args.heartbeat)  # the loop is alive, whatever the pass met
        if args.once or stop.event.wait(args.interval):
            return 1 if failed else 0


def touch(path: Path) -> None:
    try:
        path.touch()
        os.utime(path)
    except OSError as exc:
        log.warning("cannot touch heartbeat %s: %s", path, exc)


def heartbeat_problem(path: Path, max_age: float, now: float) -> str | None:
    """Why the heartbeat says the loop is stuck, or None."""
    try:
        age = now - path.stat().st_mtime
    except OSError as exc:
        return f"no heartbeat at {path}: {exc.strerror}"
    if age > max_age:
        return f"heartbeat {path} is {age:.0f} s old (more than {max_age:.0f} s): the agent's loop is stuck"
    return None


def run_healthcheck(args: argparse.Namespace) -> int:
    """``thaw healthcheck --file PATH --max-age S``: a liveness probe for a loop without a server
    (the agent: a pass hung on the API would otherwise go unnoticed)."""
    why = heartbeat_problem(args.file, args.max_age, time.time())
    if why:
        sys.stderr.write(f"thaw healthcheck: {why}\n")
        return 1
    return 0
