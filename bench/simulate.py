"""Placement policies on a synthetic cluster (``thaw simulate``), with the goals checked, scored
against the measured ground truth (``extender/measured.json``), and the scale-up bursts.

Seeds 1-10 were used to design the scoring constants and the scheduler weight; seeds 11-20 are held
out and are what this suite reports by default (``--set design`` or ``--set both`` for the others,
``--seeds`` for any list).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extender.simulate import (
    GPUS_PER_NODE,
    Result,
    burst_report,
    count_check,
    goals,
    plot,
    report,
    run_all,
    truth_report,
)

SETS = {"design": list(range(1, 11)), "held-out": list(range(11, 21))}


def summary(name: str, runs: list[list[Result]]) -> str:
    """One line per goal over a set of seeds: the range of values and on how many seeds it was met."""
    lines = [f"{name}, {len(runs)} seeds:"]
    per_goal = [[goals(r)[i] for r in runs] for i in range(len(goals(runs[0])))]
    for checks in per_goal:
        values = sorted((c[2] for c in checks), key=lambda v: float(v.rstrip("%x")))
        met = sum(c[1] for c in checks)
        lines.append(f"  {checks[0][0]}: {values[0]} .. {values[-1]}, met on {met}/{len(runs)}")
    counts = [count_check(r) for r in runs]
    loads = sorted(float(c[1].split("x")[0]) for c in counts)
    oracle = sorted(float(c[1].split("oracle ")[1].rstrip("x)")) for c in counts)
    lines.append(
        f"  (by pod count, not a goal) busiest node {loads[0]:.2f}x .. {loads[-1]:.2f}x, within 2x on "
        f"{sum(c[0] for c in counts)}/{len(runs)}; oracle {oracle[0]:.2f}x .. {oracle[-1]:.2f}x"
    )
    # The extender's count of the pods it placed against the agents' lagged reports alone.
    ratio = sorted(
        by["thaw"].mean / by["thaw-lagged"].mean for by in ({r.policy: r for r in rs} for rs in runs)
    )
    lines.append(f"  mean time-to-ready, thaw / thaw-lagged: {ratio[0]:.3f}x .. {ratio[-1]:.3f}x")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench simulate")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--pods", type=int, default=2000)
    p.add_argument("--set", choices=[*SETS, "both"], default="held-out", dest="which")
    p.add_argument("--seeds", type=int, nargs="+", help="overrides --set")
    p.add_argument("--plot", type=Path, default=Path("out/bench-simulate.png"))
    args = p.parse_args(argv)
    if args.seeds:
        chosen = {"seeds": list(args.seeds)}
    elif args.which == "both":
        chosen = dict(SETS)
    else:
        chosen = {args.which: SETS[args.which]}
    ok = True
    summaries = []
    first = True
    for name, seeds in chosen.items():
        runs = []
        for seed in seeds:
            print(f"\n{args.nodes} nodes x {GPUS_PER_NODE} GPUs, {args.pods} pods, seed {seed} ({name})")
            results = run_all(args.nodes, args.pods, seed)
            runs.append(results)
            ok &= report(results, sys.stdout)
            if first:
                first = False
                try:
                    plot(results, args.plot)
                    print(f"plot: {args.plot}")
                except Exception as exc:
                    print(f"plot skipped: {exc}")
        summaries.append(summary(name, runs))
    print("\n" + "\n".join(summaries))
    print()
    truth_report()
    burst_report()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
