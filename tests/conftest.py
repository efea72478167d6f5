"""Shared test fixtures (the captured Kubernetes requests in ../shared/fixtures/k8s/), and the
rule that nothing passes silently (tests/needs.py): a test marked ``requires(reason)`` is skipped,
or failed in CI, before its fixtures are set up; and a CI session (``CI=true``) in which any test
was skipped or xfailed for a reason outside ``needs.ALLOWED`` fails, with the list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# Session-wide image builds (debootstrap + buildah), shared by tests/manifests and tests/e2e.
from tests.images import buildah, debian_base, thaw_image  # noqa: F401
from tests.needs import allowed, has_gpu, in_ci, require, skip_reason

REPO = Path(__file__).resolve().parent.parent


# A verbatim copy of ../shared/fixtures/k8s (requests captured from a real kube-apiserver and
# kube-scheduler), kept in the repository so a clone tests without the workplace's shared folder.
FIXTURES = REPO / "tests" / "fixtures" / "k8s"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


# ---- no silent passes (tests/needs.py) ------------------------------------------------------------

# (test id, reason) of every skip or xfail whose reason is not allowed in CI, in the order seen.
_NOT_ALLOWED: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(reason): skip with the reason, or fail in CI, when reason is not None"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        require(mark.args[0])
    if item.get_closest_marker("gpu") is not None:
        require(None if has_gpu() else "needs an NVIDIA GPU with the CUDA checkpoint API (marked gpu)")


def _note(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = skip_reason(report)
    if reason is not None and not allowed(reason):
        _NOT_ALLOWED.append((report.nodeid, reason))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _NOT_ALLOWED and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (in_ci() and _NOT_ALLOWED):
        return
    terminalreporter.section("skipped in CI for a reason that is not allowed (tests/needs.py)", red=True)
    for nodeid, reason in _NOT_ALLOWED:
        terminalreporter.write_line(f"{nodeid}: {reason}")
    terminalreporter.write_line(f"CI=true: {len(_NOT_ALLOWED)} silent passes fail the run")
