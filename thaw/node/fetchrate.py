"""The node's recent fetch throughput, for the ``fetch`` field of ``thaw.dev/cache`` (issue 13).

Each Thaw pod's restore plan records what ``thaw fetch`` took to stage its snapshot (``fetch:
{bytes, seconds}``; 0 bytes for a cache hit), and the pod's outcome copy in the node cache carries
the plan. The agent reads the copies each pass, keeps the misses it has not seen (oldest first, the
last ``FETCH_SAMPLES``), and publishes their median (thaw.contract.inventory.fetch_rate). Copies go
when their pods do, so the misses are kept here, in the agent's memory: a restarted agent starts
again from the copies still there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from thaw.contract.inventory import FETCH_MIN_BYTES, FETCH_SAMPLES, FetchRate, fetch_rate
from thaw.contract.plan import parse_fetch_record


def miss_of(outcome: Mapping[str, Any]) -> tuple[int, float] | None:
    """(bytes, seconds) of the fetch an outcome's restore plan records, if it was a miss big enough
    to say something about the store (thaw.contract.inventory.FETCH_MIN_BYTES); else None."""
    plan = outcome.get("plan")
    if not isinstance(plan, Mapping) or plan.get("action") != "restore":
        return None
    record = parse_fetch_record(dict(plan["fetch"]) if isinstance(plan.get("fetch"), Mapping) else None)
    if record is None or record["bytes"] < FETCH_MIN_BYTES or record["seconds"] <= 0:
        return None
    return record["bytes"], record["seconds"]


class FetchSamples:
    """The misses the agent has seen, each once (by pod uid and start), the last FETCH_SAMPLES."""

    def __init__(self) -> None:
        self._misses: deque[tuple[int, float]] = deque(maxlen=FETCH_SAMPLES)
        self._seen: set[str] = set()

    def observe(self, copies: Iterable[tuple[str, Mapping[str, Any], float]]) -> None:
        """One pass's outcome copies, (pod uid, outcome, mtime) as read_outcome_copies yields them."""
        new: list[tuple[float, str, tuple[int, float]]] = []
        current: set[str] = set()
        for uid, outcome, mtime in copies:
            miss = miss_of(outcome)
            if miss is None:
                continue
            key = f"{uid}\0{outcome.get('started', '')}"
            current.add(key)
            if key not in self._seen:
                new.append((mtime, key, miss))
        for _, key, miss in sorted(new):  # oldest first: the deque keeps the most recent
            self._seen.add(key)
            self._misses.append(miss)
        self._seen &= current  # a copy gone (its pod gone) does not come back

    def rate(self) -> FetchRate | None:
        return fetch_rate(self._misses)
