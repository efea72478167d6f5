"""The simulator's knobs for the nodes' measured fetch throughput (bench/simulate_store.py)."""

from __future__ import annotations

import math
import random

import pytest

from extender.simulate import TRUTH, make_arrivals, make_models, simulate


def test_a_scaled_store_moves_only_the_fetch_rates() -> None:
    fast = TRUTH.scaled("fetch", 3.0)
    assert fast.rates["fetch"].median == pytest.approx(3 * TRUTH.rates["fetch"].median)
    assert fast.rates["fetch"].sigma == TRUTH.rates["fetch"].sigma
    assert {t: fast.rates[t] for t in ("memory", "disk", "cold")} == {
        t: TRUTH.rates[t] for t in ("memory", "disk", "cold")
    }
    assert math.isclose(TRUTH.scaled("fetch", 1 / 3).rates["fetch"].median * 3, TRUTH.rates["fetch"].median)


def test_the_reports_change_where_pods_go_when_the_store_is_not_the_constant() -> None:
    rng = random.Random(3)
    models = make_models(rng)
    arrivals = make_arrivals(models, 16, 400, rng)
    fast = TRUTH.scaled("fetch", 3.0)
    with_reports = simulate("thaw", 16, models, arrivals, 3, truth=fast)
    without = simulate("thaw", 16, models, arrivals, 3, truth=fast, fetch_reports=False)
    assert with_reports.times != without.times
    assert with_reports.tiers["fetch"] >= without.tiers.get("fetch", 0)  # fetching looks faster now
