"""Placement policies on a synthetic cluster (``thaw simulate``), with the goals checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extender.simulate import GPUS_PER_NODE, plot, report, run_all


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench simulate")
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--pods", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--plot", type=Path, default=Path("bench-simulate.png"))
    args = p.parse_args(argv)
    ok = True
    for seed in args.seeds:
        print(f"\n{args.nodes} nodes x {GPUS_PER_NODE} GPUs, {args.pods} pods, seed {seed}")
        results = run_all(args.nodes, args.pods, seed)
        ok &= report(results, sys.stdout)
        if seed == args.seeds[0]:
            try:
                plot(results, args.plot)
                print(f"plot: {args.plot}")
            except Exception as exc:
                print(f"plot skipped: {exc}")
    return 0 if ok else 1
