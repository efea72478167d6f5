"""Placement scoring: estimated time until the restored server is ready, per node, then 0..10.

One pure function, :func:`decide`, holds the whole formula (DESIGN.md, "Placement"). Inputs: the
pod's snapshot name and workload hash, the node (its compatibility key or partial facts, its cached
copies, its restore queue), and the cluster-wide view (which compatible variants of the snapshot
exist, their size, how many nodes hold each). Output: a :class:`Decision` with the tier, the
estimated seconds, the 0..10 score and a reason an operator can read.

The estimate, with ``B`` the snapshot's bytes and ``q`` the restores already in progress on the node:

    restore(B, tier) = RESTORE_FIXED + B / RESTORE_BPS[tier]      (tier: memory or disk)
    memory, disk     = restore(B, tier)                           * (1 + QUEUE_SHARE * q)
    fetch            = (B / FETCH_BPS + restore(B, disk))         * (1 + QUEUE_SHARE * q)
    cold             = COLD_FIXED + B / COLD_LOAD_BPS    (COLD_DEFAULT when no size is known)

``FETCH_BPS`` is the store's throughput as the nodes measure it: each node's agent reports the
median of its recent misses (``fetch`` in ``thaw.dev/cache``), and the estimate is the median of
those reports (:func:`cluster_fetch_bps`), the same for every node; with no report anywhere, the
constant. Not each node's own report: within a pool the nodes differ by noise more than by kind, and
in the simulator steering misses by it cost time (1-10% more mean time-to-ready than the median);
nor the constant beside measured nodes, which made the nodes that happened to fetch once look several
times faster to fetch onto where the store beat the constant (docs/placement.md, "Fair share and the
results").

Tiers are ordered memory < disk < fetch < cold for any snapshot over 0.08 GB with the default
constants (below that a restore's fixed 0.4 s outweighs what a cold start of so little takes: the
constants are a GPU model's; ``--scoring`` sets others, as ``thaw demo`` does). The queue
term is ServerlessLLM's: ``q`` restores in progress share the node's disk and PCIe bandwidth; with
``QUEUE_SHARE`` 1 (extender/measured.json's assumption) each takes an equal share for the whole
restore, so this one runs at 1 / (1 + q) speed.

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

The defaults are the measured ground truth of ``extender/measured.json``, each rate the median over
the runs of image bytes per second from ``thaw exec``'s start (or the fetch's) to the server's first
answer, the same fit as the simulator's ``GroundTruth``. The restores and the fetch depend on the
runtime, so they are the runs of what Thaw does by default (the fast-restore CRIU: one H200, CRIU
4.2.1, driver 580, 2026-12-01, transformers Qwen2 3.4B and the 4.3 B stand-in, 9.1 and 10.7 GB
images; the CPU stand-in for the fixed part): page cache 2.82 GB/s, disk 1.15 GB/s, fetch 1.77
GB/s. A cold start does not (it is the server starting on its own), so cold is every measured cold
start, the old runtime's six and today's four: 0.159 GB/s. So a 20 GB image: 7.5 s from page cache
(tmpfs measured the same within 0.25 s, so both are the memory tier), 17.8 s from disk, 29.1 s to
fetch and restore, 126 s cold. (With cold from today's two runs alone, 46af549: 198 s at 0.101
GB/s. Before, fitted to the six runs of the old runtime with stock CRIU, 2026-11-28, now
``gpu_before`` in the file: 11.1, 18.3, 56.0 and 90.9 s. Today's stock CRIU, the fallback, on
the same machine: page cache 1.24 GB/s, disk 0.74 GB/s, ``gpu_fallback``. Before those, one
H200's first measurements, CRIU and CUDA apart: 13.4, 15.7, 31.7 and 53.3 s.)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from extender.nodes import NodeEntry

Tier = Literal["memory", "disk", "fetch", "cold"]
TIER_ORDER: tuple[Tier, ...] = ("memory", "disk", "fetch", "cold")
MAX_SCORE = 10


@dataclass(frozen=True, slots=True)
class Params:
    """The formula's constants (bytes per second, seconds); every one is configurable (``--scoring``).

    Where each default comes from: extender/measured.json, fitted as the simulator's GroundTruth
    fits it (module docstring); tests/extender/test_scoring.py checks that they still agree.
    """

    # Restore from page cache / tmpfs: median image bytes/s of the runs' "memory" restores (CRIU's
    # pages, the CUDA restore and readiness together), less the fixed part. 2 runs, sigma 0.14
    # (fast-restore CRIU; stock CRIU, the fallback, 1.24 GB/s: measured.json gpu_fallback).
    restore_memory_bps: float = 2.82e9
    # The same with the page cache dropped ("disk"). 2 runs, sigma 0.07 (stock CRIU 0.74 GB/s).
    restore_disk_bps: float = 1.15e9
    # The part of a restore not tied to size: the CPU stand-in's restores (279 MB image), 0.36 s
    # from page cache and 0.42 s from disk, are almost all fixed cost (process tree, readiness).
    restore_fixed_s: float = 0.4
    # thaw fetch into the node cache: the runs' "fetch" (a sha256-verified copy on the same machine,
    # 1.77 GB/s, sigma 0.03). A cluster's store is faster or slower: a node whose agent reports its
    # measured fetch throughput (thaw.dev/cache "fetch") is estimated with that instead.
    fetch_bps: float = 1.77e9
    # Cold start (empty compile cache, page cache dropped): the median 0.159 GB/s of every measured
    # cold start, whichever runtime's run it was in (a cold start is the server starting on its own,
    # before any of Thaw's runtime: measured.json's cold rows, extender.simulate.cold_starts): the
    # old runtime's six (0.18-0.31 GB/s, 1-4 GPUs, 10.7-20.6 GB) and today's four (the transformers
    # model 0.056-0.061 GB/s, 150-162 s for 9.1 GB; the stand-in 0.14-0.18, 59-77 s for 10.7 GB);
    # sigma 0.57, most of it the two models apart. No part can be told apart as fixed (50-77 s for
    # 10.7-20.6 GB, no trend with size), so all of it scales with size, as in the ground truth.
    cold_fixed_s: float = 0.0
    cold_load_bps: float = 0.159e9
    cold_default_s: float = 73.2  # cold start when no copy says how big the model is: their median
    # Each restore in progress on the node costs this share of a restore's time. Not measured (no run
    # restored two at once): measured.json's own assumption, a restore shares the node equally with
    # each one in progress. Against 0.5 (the guess before) in thaw simulate, under the ground truth
    # before 2026-12-01: mean time-to-ready 0.2-1.3% lower, a burst of 8 replicas onto one page-cache
    # holder 32.3 s instead of 35.9 s.
    queue_share: float = 1.0
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
    rate = p.restore_memory_bps if tier == "memory" else p.restore_disk_bps
    return p.restore_fixed_s + size / rate


def fetch_seconds(size: int, bps: float | None = None, p: Params = DEFAULT_PARAMS) -> float:
    """Fetch then restore from disk, without the queue: at ``bps`` (a measured fetch throughput),
    else at ``fetch_bps``."""
    return size / (bps or p.fetch_bps) + restore_seconds(size, "disk", p)


FETCH_GRID = 8  # cluster_fetch_bps steps per doubling (~9%)


def cluster_fetch_bps(reported: Iterable[float]) -> float | None:
    """The store's fetch throughput as the nodes measure it: the median of their reports, on a grid
    of FETCH_GRID steps per doubling, so that a new report moves it (and every fetch estimate) only
    when the median moves by a step. None without a report."""
    rates = [r for r in reported if r > 0]
    if not rates:
        return None
    return float(2 ** (round(math.log2(statistics.median(rates)) * FETCH_GRID) / FETCH_GRID))


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
    cluster_fetch: float | None = None,
    p: Params = DEFAULT_PARAMS,
) -> Decision:
    """Estimate time-to-ready of ``snapshot``/``workload`` on ``node``; see the module docstring.

    ``variants``: compat key -> Variant, every compatible build of this snapshot and workload that a
    node's cache lists (the extender's view of the store). ``known_facts``: compat key -> flattened
    facts of nodes with that key, to match nodes that only have GPU Feature Discovery labels.
    ``node_count``: nodes in the cluster view, for the spread term. ``cluster_fetch``: the store's
    measured fetch throughput (:func:`cluster_fetch_bps` of the nodes' reports), None for none.
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
        t = fetch_seconds(size, cluster_fetch, p) * queue
        measured = f" at the nodes' measured {cluster_fetch / 1e9:.2f} GB/s" if cluster_fetch else ""
        return Decision(
            "fetch",
            t,
            cold,
            score_of(t, cold, best, 1.0),
            True,
            f"fetch {_gb(size)}{measured} then restore ~{t:.1f} s vs cold ~{cold:.1f} s{queue_note}",
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
        t = fetch_seconds(size, cluster_fetch, p) * queue
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
