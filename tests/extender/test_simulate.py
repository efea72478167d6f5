"""The simulator replays the real scoring beside its baselines; the CLI reports and plots."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from bench.simulate import SETS
from bench.simulate import main as bench_main
from extender.scoring import Params
from extender.simulate import (
    MEASURED,
    POLICIES,
    TRUTH,
    Model,
    SimNode,
    burst,
    goals,
    make_arrivals,
    make_models,
    run_all,
    simulate,
    true_time,
)
from thaw.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_policies_see_the_same_arrivals_and_thaw_beats_spreading() -> None:
    results = {r.policy: r for r in run_all(24, 400, seed=5)}
    assert set(results) == set(POLICIES)
    placed = {len(r.times) + r.unplaced for r in results.values()}
    assert placed == {400}
    assert results["thaw"].local_share > results["spread"].local_share
    assert results["oracle"].mean <= results["spread"].mean
    assert next(g[0] for g in goals(list(results.values()))).startswith("local-hit share")


def test_cli_reports_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "ttr.png"
    rc = main(["simulate", "--nodes", "16", "--pods", "200", "--seed", "2", "--plot", str(png)])
    out = capsys.readouterr().out
    # Exit 1 exactly when a goal is not met, and the report says which.
    checks = goals(run_all(16, 200, 2))
    assert rc == (0 if all(met for _, met, _ in checks) else 1)
    for goal, met, value in checks:
        assert f"goal: {goal}: {value} -> {'met' if met else 'NOT met'}" in out
    assert "goal: mean time-to-ready within 10% of the oracle's" in out
    assert "memory, disk and fetch from 2 GPU runs of the default path, cold from 10 cold starts" in out
    assert "bursts (16 idle nodes" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_sizes_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--nodes", "1"]) == 2
    assert "--nodes must be at least 2" in capsys.readouterr().err


def test_fair_share_weighs_placements_by_gpus() -> None:
    rng = random.Random(3)
    models = [Model(f"m{i}", 10 * 10**9, gpus) for i, gpus in enumerate((1, 4))]
    arrivals = make_arrivals(models, 8, 300, rng)
    r = simulate("spread", 8, models, arrivals, seed=3)
    assert r.fair_gpus > r.fair  # the 4-GPU model counts four times
    ones = [Model(m.name, m.bytes, 1) for m in models]
    r1 = simulate("spread", 8, ones, make_arrivals(ones, 8, 300, random.Random(3)), seed=3)
    assert (r1.placed_gpus_max, r1.fair_gpus) == (r1.placed_max, r1.fair) and r1.gpu_load == r1.load


def test_scoring_constants_do_not_change_the_world_they_are_measured_in() -> None:
    rng = random.Random(4)
    models = make_models(rng)
    arrivals = make_arrivals(models, 16, 300, rng)
    a = simulate("oracle", 16, models, arrivals, seed=4)
    b = simulate("oracle", 16, models, arrivals, seed=4, p=Params(queue_share=5.0, fetch_bps=1e8))
    assert a.times == b.times
    loose = simulate("thaw", 16, models, arrivals, seed=4, p=Params(spread_weight=0.0))
    tight = simulate("thaw", 16, models, arrivals, seed=4, p=Params(spread_weight=0.9))
    assert loose.local_share >= tight.local_share and loose.times != tight.times


def test_bench_reports_held_out_seeds_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_main(["--nodes", "8", "--pods", "60", "--seeds", "11", "--plot", "/nonexistent/x.png"])
    out = capsys.readouterr().out
    assert rc == (0 if all(met for _, met, _ in goals(run_all(8, 60, 11))) else 1)
    assert "seed 11 (seeds)" in out and "(by pod count, not a goal)" in out
    assert "no node above 2x its fair share of GPU-placements" in out
    assert SETS["held-out"] == list(range(11, 21)) and not set(SETS["held-out"]) & set(SETS["design"])


def test_the_ground_truth_is_the_measured_runs_not_the_scorer() -> None:
    doc = json.loads(MEASURED.read_text())
    runs = doc["gpu"]["runs"]
    disk = [r["image_bytes"] / (r["disk"] - doc["cpu"]["disk"]) for r in runs]
    assert TRUTH.rates["disk"].median == pytest.approx(math.exp(statistics.fmean(math.log(x) for x in disk)))
    assert TRUTH.rates["disk"].sigma == pytest.approx(statistics.stdev(math.log(x) for x in disk))
    assert all(TRUTH.rates[t].n == len(runs) == 2 for t in ("memory", "disk", "fetch"))
    assert TRUTH.queue_share == doc["queue"]["share"]
    # Cold from every cold start measured, whichever runtime's run it was in, each once: the old
    # runtime's six, today's two stock-CRIU runs and the two default-path runs (listed under both
    # gpu and gpu_fallback, counted once).
    colds = {
        (r["source"], r["image_bytes"], r["cold"])
        for s in ("gpu", "gpu_fallback", "gpu_before")
        for r in doc[s]["runs"]
    }
    assert len(colds) == len({c[0] for c in colds}) == TRUTH.rates["cold"].n == 10
    assert set(TRUTH.sources["cold"]) == {c[0] for c in colds} and TRUTH.sources["memory"] == tuple(
        r["source"] for r in runs
    )
    cold = [b / c for _, b, c in colds]
    assert TRUTH.rates["cold"].median == pytest.approx(math.exp(statistics.fmean(math.log(x) for x in cold)))
    assert TRUTH.rates["cold"].sigma == pytest.approx(statistics.stdev(math.log(x) for x in cold))
    # Each run's numbers are the benchmark's own: the default path's (fast-restore CRIU) as the
    # truth, today's stock CRIU and the old runtime's beside it, unread.
    assert {r["path"] for r in runs} == {"fast-restore CRIU"}
    assert {r["path"] for r in doc["gpu_fallback"]["runs"]} == {"stock CRIU"}
    for r in [*runs, *doc["gpu_fallback"]["runs"]]:
        life = json.loads((REPO / r["source"]).read_text())[r["life"]]
        for tier, hit in r["hits"].items():
            assert r[tier] == life["hits"][hit]["first_answer_s"]
            assert life.get("hit_tier", {}).get(hit, hit) == {"memory": "page cache"}.get(tier, tier)
        assert r["cold"] == life[r["cold_from"]]["first_answer_s"] and r["fetch"] == life["fetch"]["fetch_s"]
        assert r["image_bytes"] == life["image_bytes"] == life["checkpoint"]["outcome"]["checkpoint"]["bytes"]
        assert life["extra_read_bytes"] == 0  # the image is all a restore reads (no weights out of it)
    for r in doc["gpu_before"]["runs"]:
        result = json.loads((REPO / r["source"]).read_text())
        assert r["cold"] == result["cold"]["first_answer_s"] and r["fetch"] == result["fetch_s"]
        assert r["disk"] == result["restore_disk"]["first_answer_s"]
        assert r["memory"] == result["restore_pagecache"]["first_answer_s"]
        assert r["image_bytes"] == result["checkpoint"]["outcome"]["checkpoint"]["bytes"]
    # The scorer's constants do not enter it: a node's real time only moves with the truth.
    node = SimNode("n", "h100", rates=TRUTH.node_rates(random.Random(1)))
    model = Model("m", 20 * 10**9, 1)
    assert true_time(node, model, True, 0.0)[1] == pytest.approx(
        20e9 / node.rates["fetch"] + TRUTH.fixed["disk"] + 20e9 / node.rates["disk"]
    )


def test_the_agents_report_lags_one_pass() -> None:
    node = SimNode("n", "h100", phase=10.0)
    node.starts.append((12.0, 50.0, True))  # a restore from t=12 to t=50
    node.starts.append((13.0, 20.0, False))  # a cold start: the agent does not count it
    assert [node.restoring(t) for t in (11.0, 14.0, 30.0)] == [0, 2, 1]
    # Passes at 10, 40, 70: the restore shows from the pass at 40 until the one at 70.
    assert [node.reported(t) for t in (14.0, 39.9, 40.0, 69.9, 70.0)] == [0, 0, 1, 1, 0]


def test_a_burst_on_one_holder_spreads_only_with_the_count() -> None:
    lagged = [burst("thaw-lagged", holders=1, replicas=8, seed=s) for s in range(1, 6)]
    counted = [burst("thaw", holders=1, replicas=8, seed=s) for s in range(1, 6)]
    # Without the count the one page-cache holder looks idle to every replica of the burst: it
    # takes them until the scheduler's own spreading outweighs the extender (with the measured
    # fetch at 1.77 GB/s the fetching nodes score close enough that this is after 4 replicas).
    assert all(r.placed_max >= 4 for r in lagged)
    # With the count: the holder with two in progress (3 x 7.5 s for 20 GB) is still sooner than a
    # fetch and a restore from disk (29.1 s), so it takes a third, as the oracle does (3-4), no more.
    assert all(r.placed_max <= 3 for r in counted)
    assert statistics.fmean(r.mean for r in counted) < 0.97 * statistics.fmean(r.mean for r in lagged)
