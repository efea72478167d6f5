"""The simulator replays the real scoring beside its baselines; the CLI reports and plots."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.simulate import SETS
from bench.simulate import main as bench_main
from extender.scoring import Params
from extender.simulate import POLICIES, Model, goals, make_arrivals, make_models, run_all, simulate
from thaw.cli import main


def test_policies_see_the_same_arrivals_and_thaw_beats_spreading() -> None:
    results = {r.policy: r for r in run_all(24, 400, seed=5)}
    assert set(results) == set(POLICIES)
    placed = {len(r.times) + r.unplaced for r in results.values()}
    assert placed == {400}
    assert results["thaw"].local_share > results["spread"].local_share
    assert results["oracle"].mean <= results["spread"].mean
    assert next(g[0] for g in goals(list(results.values()))).startswith("local-hit share")


def test_cli_reports_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "ttr.png"
    rc = main(["simulate", "--nodes", "16", "--pods", "200", "--seed", "2", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 when a goal is not met; the report says which
    assert "goal: mean time-to-ready within 10% of the oracle's" in out
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
    assert rc in (0, 1)
    assert "seed 11 (seeds)" in out and "(by pod count, not a goal)" in out
    assert "no node above 2x its fair share of GPU-placements" in out
    assert SETS["held-out"] == list(range(11, 21)) and not set(SETS["held-out"]) & set(SETS["design"])
