"""Benchmarks: ``make bench`` runs ``python -m bench``.

A suite's ``main(argv)`` returns 0 when its goals were met, 1 when one was missed or the suite
failed, and ``NOT_RUN`` (through :func:`not_run`) when it could not run here: a missing tool, no
root. A suite that did not run met no goal, and ``make bench`` says so.
"""

from __future__ import annotations

NOT_RUN = 3


def not_run(suite: str, why: str) -> int:
    """Say that ``suite`` could not run, and why; ``NOT_RUN`` for its ``main`` to return."""
    print(f"{suite}: did not run ({why})", flush=True)
    return NOT_RUN
