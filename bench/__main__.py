"""``make bench``: every benchmark, each beside its baseline in the same run.

Each module in ``SUITES`` has ``main(argv) -> int`` and prints its own table. ``python -m bench NAME``
runs one suite.
"""

from __future__ import annotations

import importlib
import sys

SUITES = ["bench.webhook", "bench.extender", "bench.simulate", "bench.runtime_cpu"]


def main(argv: list[str]) -> int:
    chosen = [s for s in SUITES if not argv or s.rsplit(".", 1)[1] in argv]
    if not chosen:
        sys.stderr.write(
            f"bench: unknown suite in {argv}; known: {', '.join(s.rsplit('.', 1)[1] for s in SUITES)}\n"
        )
        return 2
    failed = 0
    for suite in chosen:
        print(f"\n=== {suite} ===", flush=True)
        try:
            module = importlib.import_module(suite)
        except ModuleNotFoundError as exc:
            print(f"{suite}: not available ({exc})")
            failed += 1
            continue
        failed += int(module.main([]) != 0)
    return 1 if failed else 0


sys.exit(main(sys.argv[1:]))
