"""``thaw simulate`` with stores faster and slower than the benchmark's: what the nodes' measured fetch
throughput (``fetch`` in ``thaw.dev/cache``, the extender's median of the reports) buys over a
constant, and over the constants before the measured ones.

The ground truth is extender/measured.json's with every node's fetch rate drawn around ``k`` times
the measured median (1.77 GB/s): 1, 3 (a faster registry) and 1/3 (a slower link). Each variant
scores the same arrivals; the oracle is the same. Goal: the median of the reports is no worse than
the constant (within 1%) at any store.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

from extender.scoring import DEFAULT_PARAMS, Params
from extender.simulate import TRUTH, make_arrivals, make_models, simulate

# The constants before the measured ones (one H200's first measurements: CRIU pages at 2.1 GB/s from
# page cache and 1.7 GB/s from disk, CUDA at 5 GB/s over 80% of the image, 0.7 s fixed; a 10 Gb/s
# store; cold 20 s + 0.6 GB/s), in the current formula.
EARLIER = Params(
    restore_memory_bps=1 / (1 / 2.1e9 + 0.8 / 5e9),
    restore_disk_bps=1 / (1 / 1.7e9 + 0.8 / 5e9),
    restore_fixed_s=0.7,
    fetch_bps=1.25e9,
    cold_fixed_s=20.0,
    cold_load_bps=0.6e9,
    cold_default_s=34.0,
    queue_share=0.5,
)
VARIANTS = (
    ("constants before", EARLIER, False),
    ("measured, fetch constant", DEFAULT_PARAMS, False),
    ("measured + nodes' median", DEFAULT_PARAMS, True),
)
STORES = (1.0, 3.0, 1 / 3)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench simulate_store")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--pods", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 21)))
    args = ap.parse_args(argv)
    print(
        f"{args.nodes} nodes, {args.pods} pods, seeds {args.seeds[0]}..{args.seeds[-1]}: "
        "mean time-to-ready (x the oracle's)"
    )
    print(f"{'store':<12}" + "".join(f"{name:>30}" for name, _, _ in VARIANTS))
    ok = True
    for k in STORES:
        truth = TRUTH.scaled("fetch", k)
        means: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in VARIANTS}
        for seed in args.seeds:
            rng = random.Random(seed)
            models = make_models(rng)
            arrivals = make_arrivals(models, args.nodes, args.pods, rng)
            oracle = simulate("oracle", args.nodes, models, arrivals, seed, truth=truth).mean
            for name, p, reports in VARIANTS:
                t = simulate(
                    "thaw", args.nodes, models, arrivals, seed, p=p, truth=truth, fetch_reports=reports
                )
                means[name].append((t.mean, t.mean / oracle))
        cells = [
            f"{statistics.fmean(m for m, _ in v):.2f} s ({statistics.fmean(r for _, r in v):.3f}x)"
            for v in means.values()
        ]
        label = f"{TRUTH.rates['fetch'].median * k / 1e9:.2f} GB/s"
        print(f"{label:<12}" + "".join(f"{c:>30}" for c in cells), flush=True)
        constant = statistics.fmean(m for m, _ in means[VARIANTS[1][0]])
        median = statistics.fmean(m for m, _ in means[VARIANTS[2][0]])
        ok &= median <= constant * 1.01
    print(
        "goal: the nodes' median no worse than the constant (within 1%) at every store -> "
        + ("met" if ok else "NOT met")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
