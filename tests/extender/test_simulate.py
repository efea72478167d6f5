"""The simulator replays the real scoring beside its baselines; the CLI reports and plots."""

from __future__ import annotations

from pathlib import Path

import pytest

from extender.simulate import POLICIES, goals, run_all
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
