"""Goldens: what a test expects, kept in a file beside it and reviewed like code.

One rule for every golden in the suite (the webhook's matrix, the copy of the captured Kubernetes
requests): a golden is compared, never written, unless ``THAW_REGENERATE_GOLDENS=1`` asks for it;
then it is written and the comparison is skipped (a test that compared with the file it had just
written would prove nothing), and the person who asked reviews the diff and runs again without the
switch. The switch fails the test where ``CI=true``. A missing golden fails, a stale one fails, and
:func:`check_all_used` fails on a golden that no case produces any more.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.needs import in_ci

SWITCH = "THAW_REGENERATE_GOLDENS"


def regenerating() -> bool:
    """Whether goldens are to be written in this run; fails the test when asked for in CI."""
    if os.environ.get(SWITCH) != "1":
        return False
    if in_ci():
        pytest.fail(f"{SWITCH}=1 with CI=true: goldens are written by a person, and reviewed", pytrace=False)
    return True


def _write(golden: Path, actual: bytes) -> None:
    golden.parent.mkdir(parents=True, exist_ok=True)
    golden.write_bytes(actual)


def _compare(golden: Path, actual: bytes) -> None:
    assert golden.exists(), f"{golden} is missing: write it with {SWITCH}=1 and review it"
    assert golden.read_bytes() == actual, (
        f"{golden} is stale: regenerate it with {SWITCH}=1 and review the diff"
    )


def check_bytes(golden: Path, actual: bytes) -> None:
    """``actual`` must be what ``golden`` holds; with the switch, it is written there instead."""
    if regenerating():
        _write(golden, actual)
        pytest.skip(f"{golden.name} written: review the diff, then run without {SWITCH}")
    _compare(golden, actual)


def check_files(directory: Path, actual: Mapping[str, bytes]) -> None:
    """``directory`` holds exactly the files of ``actual`` (name relative to it -> content); with
    the switch, they are written there instead (a file no longer produced is left for a person to
    delete: the run without the switch names it)."""
    if regenerating():
        for name, data in actual.items():
            _write(directory / name, data)
        pytest.skip(f"{len(actual)} files written in {directory}: review the diff, then run without {SWITCH}")
    for name, data in actual.items():
        _compare(directory / name, data)
    check_all_used(directory, "**/*", actual)


def check_json(golden: Path, actual: Any) -> None:
    """``actual`` must equal the JSON in ``golden`` (compared as values, for pytest's diff), which
    the switch writes indented with sorted keys."""
    if regenerating():
        check_bytes(golden, (json.dumps(actual, indent=2, sort_keys=True) + "\n").encode())
    assert golden.exists(), f"{golden} is missing: write it with {SWITCH}=1 and review it"
    expected = json.loads(golden.read_text())
    assert expected == actual, f"{golden} is stale: regenerate it with {SWITCH}=1 and review the diff"


def check_all_used(directory: Path, pattern: str, produced: Iterable[str]) -> None:
    """Every golden in ``directory`` matching ``pattern`` is one of ``produced`` (names relative to
    ``directory``): a golden no case produces is stale and fails."""
    unused = sorted(str(p.relative_to(directory)) for p in directory.glob(pattern) if p.is_file())
    unused = sorted(set(unused) - set(produced))
    assert not unused, f"goldens in {directory} that no case produces (delete them): {unused}"
