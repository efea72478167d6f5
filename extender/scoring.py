"""Placement scoring: estimated time until the restored server is ready, per node, then 0..10.

One pure function, :func:`decide`, holds the whole formula (DESIGN.md, "Placement"). Inputs: the
pod's snapshot name and workload hash, the node (its compatibility key or partial facts, its cached
copies, its restore queue), and the cluster-wide view (which compatible variants of the snapshot
exist, their size, how many nodes hold each). Output: a :class:`Decision` with the tier, the
estimated seconds, the 0..10 score and a reason an operator can read.

The estimate, with ``B`` the snapshot's bytes and ``q`` the restores already in progress on the node:

    restore(B, tier) = RESTORE_FIXED + B / CRIU_BPS[tier] + GPU_FRACTION * B / CUDA_RESTORE_BPS
    memory, disk     = restore(B, tier)                 * (1 + QUEUE_SHARE * q)
    fetch            = (B / FETCH_BPS + restore(B, disk)) * (1 + QUEUE_SHARE * q)
    cold             = COLD_FIXED + B / COLD_LOAD_BPS     (COLD_DEFAULT when no size is known)

Tiers are ordered memory < disk < fetch < cold for any size with the default constants. The queue
term is ServerlessLLM's: ``q`` restores in progress share the node's disk and PCIe bandwidth, and on
average are half done, so this one runs at about 1 / (1 + q/2) speed.

The score is the share of the possible speed-up this node delivers, on a log scale (a 2x faster
start is worth the same anywhere on the range)::

    score = 10 * ln(cold / t) / ln(cold / restore(B, memory))      clipped to 0..10

and, for nodes that already hold the snapshot, scaled ImageLocality-style by how widely it is held
(``holders / nodes``), so that a rare snapshot's only holder wins ties but loses sooner once it is
busy, and the scheduler's spreading plugins get a say: ``* (1 - SPREAD_WEIGHT * (1 - holders/nodes))``.
The damping is kept light (0.1): the restore queue above is what makes a busy holder lose, and it
counts what the node really has in progress (``restoring``, from the node's annotation, or the Thaw
pods the extender itself placed there in the last ``placed_window_s``, whichever is larger: the
annotation lags up to one agent pass), where the damping only knows how rare the snapshot is.
The extender cannot see how many replicas a node runs; the scheduler's own spreading
(PodTopologySpread, NodeResourcesFit) weighs that.
A node that can restore at all scores at least 1; a node that can only cold-start scores 0.

The defaults come from measurements on an H200 node with CRIU 4.2.1 (DESIGN.md): CRIU restores image
pages at 1.7 GB/s from disk and 2.1 GB/s from page cache, CUDA restore 4-6 GB/s, a 6 GiB model
(8.1 GB image) restored in 6.8 s and cold-started in 34 s. With them ``restore(8.1 GB, disk)`` is
6.8 s and ``cold(8.1 GB)`` is 33.5 s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from extender.nodes import NodeEntry

Tier = Literal["memory", "disk", "fetch", "cold"]
TIER_ORDER: tuple[Tier, ...] = ("memory", "disk", "fetch", "cold")
MAX_SCORE = 10


@dataclass(frozen=True, slots=True)
class Params:
    """The formula's constants (bytes per second, seconds); every one is configurable."""

    criu_disk_bps: float = 1.7e9  # CRIU image pages from local disk (measured)
    criu_memory_bps: float = 2.1e9  # CRIU image pages from page cache / tmpfs (measured)
    cuda_restore_bps: float = 5.0e9  # cuCheckpointProcessRestore, GPU memory back (4-6 GB/s measured)
    gpu_fraction: float = 0.8  # share of the image that is GPU memory (6.5 of 8.1 GB measured)
    restore_fixed_s: float = 0.7  # process tree, sockets, CUDA context (6.8 s measured - pages)
    fetch_bps: float = 1.25e9  # store or peer to node cache (10 Gb/s); set per cluster
    cold_fixed_s: float = 20.0  # imports, compile, graph capture: the part not tied to size
    cold_load_bps: float = 0.6e9  # weights from the image/registry into GPU memory at cold start
    cold_default_s: float = 34.0  # cold start when no copy says how big the model is (measured)
    queue_share: float = 0.5  # each restore in progress costs this share of a restore's time
    # ImageLocality-style damping of holders by 1 - holders/nodes. thaw simulate (design seeds 1-10):
    # 0.4 cost 4-8% of the oracle's local hits and did not keep the busiest node lower; 0.1 keeps
    # rare snapshots' holders slightly behind common ones at 0-1.5% of the hits.
    spread_weight: float = 0.1
    # How long a pod the extender placed counts as a restore in progress on its node (index.py,
    # "Placed pods"): the agent's pass interval, after which the node's own ``restoring`` has it.
    # 0 turns the count off (the queue is then only what the agents report, up to 30 s late).
    placed_window_s: float = 30.0


DEFAULT_PARAMS = Params()


@dataclass(frozen=True, slots=True)
class Variant:
    """A compatible build of the snapshot somewhere in the cluster: one compat key."""

    bytes: int
    holders: int  # nodes whose thaw.dev/cache lists it


@dataclass(frozen=True, slots=True)
class Decision:
    tier: Tier
    seconds: float
    cold_seconds: float
    score: int
    # False: this node cannot restore the snapshot (filtered when placement is required).
    restorable: bool
    reason: str


def restore_seconds(size: int, tier: Literal["memory", "disk"], p: Params = DEFAULT_PARAMS) -> float:
    criu = p.criu_memory_bps if tier == "memory" else p.criu_disk_bps
    return p.restore_fixed_s + size / criu + p.gpu_fraction * size / p.cuda_restore_bps


def cold_seconds(size: int | None, p: Params = DEFAULT_PARAMS) -> float:
    if not size:
        return p.cold_default_s
    return p.cold_fixed_s + size / p.cold_load_bps


def spread_factor(holders: int, node_count: int, p: Params = DEFAULT_PARAMS) -> float:
    """The ImageLocality-style damping of a holder's score (module docstring)."""
    held = min(holders, node_count) / node_count if node_count else 1.0
    return 1.0 - p.spread_weight * (1.0 - held)


def score_of(t: float, cold: float, best: float, spread: float) -> int:
    """The 0..10 score of an estimate ``t`` against ``cold`` and ``best`` (module docstring)."""
    if t >= cold or cold <= best:
        return 0
    share = math.log(cold / t) / math.log(cold / best) if t > best else 1.0
    return max(1, min(MAX_SCORE, round(MAX_SCORE * share * spread)))


def _matches(partial: Mapping[str, str | int], facts: Mapping[str, str | int]) -> bool:
    return all(facts.get(k) == v for k, v in partial.items())


def _gb(size: int) -> str:
    return f"{size / 1e9:.1f} GB"


def decide(
    snapshot: str,
    workload: str,
    node: NodeEntry,
    *,
    variants: Mapping[str, Variant],
    known_facts: Mapping[str, Mapping[str, str | int]],
    node_count: int,
    p: Params = DEFAULT_PARAMS,
) -> Decision:
    """Estimate time-to-ready of ``snapshot``/``workload`` on ``node``; see the module docstring.

    ``variants``: compat key -> Variant, every compatible build of this snapshot and workload that a
    node's cache lists (the extender's view of the store). ``known_facts``: compat key -> flattened
    facts of nodes with that key, to match nodes that only have GPU Feature Discovery labels.
    ``node_count``: nodes in the cluster view, for the spread term.
    """
    any_size = max((v.bytes for v in variants.values()), default=0)
    cold = cold_seconds(any_size, p)
    queue = 1.0 + p.queue_share * node.restoring
    q = node.restoring
    queue_note = f", {q:g} restore(s) in progress" if q == int(q) else f", {q:.2f} restore(s) in progress"
    queue_note = queue_note if q else ""

    def cold_decision(why: str) -> Decision:
        return Decision("cold", cold, cold, 0, False, f"cold start ~{cold:.1f} s: {why}")

    if node.compat is not None:
        variant = variants.get(node.compat)
        if variant is None:
            if variants:
                # Which other builds exist is left out: a new build elsewhere then changes no
                # answer about this node (extender/index.py updates only what a change reaches).
                return cold_decision(
                    f"snapshot {snapshot} exists only for other node facts, "
                    f"not this node's (compat {node.compat})"
                )
            return cold_decision(f"no node's thaw.dev/cache lists snapshot {snapshot} for this workload")
        size = variant.bytes
        best = restore_seconds(size, "memory", p)
        local: Literal["memory", "disk"] | None = None
        for c in node.copies:
            if c.name == snapshot and c.workload == workload and c.compat == node.compat:
                if c.tier == "memory" or local is None:
                    local = c.tier
                size = c.bytes or size
        if local is not None:
            t = restore_seconds(size, local, p) * queue
            score = score_of(t, cold, best, spread_factor(variant.holders, node_count, p))
            return Decision(
                local,
                t,
                cold,
                score,
                True,
                f"{local} hit: restore {_gb(size)} ~{t:.1f} s vs cold ~{cold:.1f} s"
                f"{queue_note}; held by {variant.holders}/{node_count} nodes",
            )
        t = (size / p.fetch_bps + restore_seconds(size, "disk", p)) * queue
        return Decision(
            "fetch",
            t,
            cold,
            score_of(t, cold, best, 1.0),
            True,
            f"fetch {_gb(size)} then restore ~{t:.1f} s vs cold ~{cold:.1f} s{queue_note}",
        )

    if node.partial:
        # GPU Feature Discovery labels only: a variant whose known facts agree may be restorable
        # (CRIU and anything unlabelled unchecked); the agent has not run, so nothing is cached.
        matching = [
            v for k, v in variants.items() if k in known_facts and _matches(node.partial, known_facts[k])
        ]
        if not matching:
            return cold_decision(
                f"GPU labels ({node.partial.get('gpu.product', '?')}, driver "
                f"{node.partial.get('driver', '?')}) match no node facts that snapshot {snapshot} exists for"
            )
        size = max(v.bytes for v in matching)
        t = (size / p.fetch_bps + restore_seconds(size, "disk", p)) * queue
        best = restore_seconds(size, "memory", p)
        return Decision(
            "fetch",
            t,
            cold,
            score_of(t, cold, best, 1.0),
            True,
            f"fetch {_gb(size)} then restore ~{t:.1f} s vs cold ~{cold:.1f} s (facts from GPU labels, "
            "no thaw.dev/facts yet)",
        )
    return cold_decision("node has no readable thaw.dev/facts and no GPU Feature Discovery labels")
