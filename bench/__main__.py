"""``make bench``: every benchmark, each beside its baseline in the same run.

Each module in ``SUITES`` has ``main(argv) -> int`` and prints its own table. ``python -m bench NAME``
runs one suite.
"""

from __future__ import annotations

import importlib
import sys

SUITES = [
    "bench.webhook",
    "bench.extender",
    "bench.simulate",
    "bench.runtime_cpu",
    "bench.install_runtime",
    "bench.pid_floor",
    "bench.registry",
    "bench.snapshot_io",
]


def main(argv: list[str]) -> int:
    chosen = [s for s in SUITES if not argv or s.rsplit(".", 1)[1] in argv]
    if not chosen:
        sys.stderr.write(
            f"bench: unknown suite in {argv}; known: {', '.join(s.rsplit('.', 1)[1] for s in SUITES)}\n"
        )
        return 2
    missed: list[str] = []
    for suite in chosen:
        print(f"\n=== {suite} ===", flush=True)
        try:
            module = importlib.import_module(suite)
        except ModuleNotFoundError as exc:
            print(f"{suite}: not available ({exc})")
            missed.append(suite)
            continue
        if module.main([]) != 0:
            missed.append(suite)
    # Each suite prints its own goals; this line says where to look. Exit 1 when a goal was missed
    # or a suite could not run, so a script can tell.
    print(
        f"\nbench: {'goals missed or suite failed in: ' + ', '.join(missed) if missed else 'every goal met'}"
    )
    return 1 if missed else 0


sys.exit(main(sys.argv[1:]))
