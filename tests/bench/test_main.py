"""``make bench``'s last line and exit code (bench/__main__.py): "every goal met" only when every
suite ran and met its goals; a suite that could not run is named as not run, and so is the exit
code; a missed goal or a suite that raised wins over both."""

from __future__ import annotations

import sys
import types

import pytest

from bench import NOT_RUN, not_run
from bench.__main__ import main


def _suite(monkeypatch: pytest.MonkeyPatch, name: str, code: int | None) -> str:
    """A suite module ``fake.NAME`` whose main returns ``code`` (None: it raises)."""
    module = types.ModuleType(f"fake.{name}")

    def run(argv: list[str]) -> int:
        if code is None:
            raise RuntimeError(f"{name} broke")
        if code == NOT_RUN:
            return not_run(name, "needs a tool this machine lacks")
        return code

    module.main = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"fake.{name}", module)
    return f"fake.{name}"


@pytest.mark.parametrize(
    ("codes", "exit_code", "lines"),
    [
        ({"a": 0, "b": 0}, 0, ["bench: every goal met (2 suites)"]),
        (
            {"a": 0, "b": NOT_RUN},
            NOT_RUN,
            ["b: did not run (needs a tool", "bench: did not run (no goal met): fake.b"],
        ),
        (
            {"a": 1, "b": NOT_RUN},
            1,
            ["goals missed or suite failed in: fake.a", "did not run (no goal met): fake.b"],
        ),
        ({"a": None, "b": 0}, 1, ["RuntimeError: a broke", "goals missed or suite failed in: fake.a"]),
    ],
)
def test_summary_names_what_missed_and_what_did_not_run(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    codes: dict[str, int | None],
    exit_code: int,
    lines: list[str],
) -> None:
    suites = [_suite(monkeypatch, name, code) for name, code in codes.items()]
    assert main([], suites) == exit_code
    out, err = capfd.readouterr()
    for line in lines:
        assert line in out + err, out + err
    assert ("every goal met" in out) == (exit_code == 0)


def test_one_suite_by_name_and_an_unknown_name(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    suites = [_suite(monkeypatch, "a", NOT_RUN), _suite(monkeypatch, "b", 0)]
    assert main(["b"], suites) == 0
    assert "=== fake.a ===" not in capfd.readouterr().out
    assert main(["c"], suites) == 2
    assert "unknown suite" in capfd.readouterr().err
