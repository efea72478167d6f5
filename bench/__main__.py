"""``make bench``: every benchmark, each beside its baseline in the same run.

Each module in ``SUITES`` has ``main(argv) -> int`` and prints its own table. ``python -m bench NAME``
runs one suite.

The last line names the suites that missed a goal or failed, and those that did not run (a missing
tool, no root: ``bench.not_run``). "every goal met" only when every chosen suite ran and met its
goals. Exit 0 then; 1 when a goal was missed or a suite failed; ``bench.NOT_RUN`` (3) when every
suite that ran met its goals but some did not run: a benchmark that did not run met no goal.
"""

from __future__ import annotations

import importlib
import sys
import traceback

from bench import NOT_RUN

SUITES = [
    "bench.webhook",
    "bench.extender",
    "bench.simulate",
    "bench.simulate_store",
    "bench.runtime_cpu",
    "bench.install_runtime",
    "bench.pid_floor",
    "bench.registry",
    "bench.snapshot_io",
    "bench.criu_restore",
]


def main(argv: list[str], suites: list[str] = SUITES) -> int:
    chosen = [s for s in suites if not argv or s.rsplit(".", 1)[1] in argv]
    if not chosen:
        sys.stderr.write(
            f"bench: unknown suite in {argv}; known: {', '.join(s.rsplit('.', 1)[1] for s in suites)}\n"
        )
        return 2
    missed: list[str] = []
    skipped: list[str] = []
    for suite in chosen:
        print(f"\n=== {suite} ===", flush=True)
        try:
            code = importlib.import_module(suite).main([])
        except Exception:  # one broken suite (or one that cannot import) does not hide the others
            traceback.print_exc()
            code = 1
        if code == NOT_RUN:
            skipped.append(suite)
        elif code != 0:
            missed.append(suite)
    print()
    if missed:
        print(f"bench: goals missed or suite failed in: {', '.join(missed)}")
    if skipped:
        print(f"bench: did not run (no goal met): {', '.join(skipped)}")
    if not missed and not skipped:
        print(f"bench: every goal met ({len(chosen)} suites)")
    return 1 if missed else NOT_RUN if skipped else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
