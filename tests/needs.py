"""One rule for a test that cannot run here: it says why, and in CI it fails instead of passing.

``require(reason)`` does nothing when ``reason`` is None; otherwise it skips the test with the
reason, or fails it where ``CI=true`` (.ci/run sets it): CI runs as root with every tool that
``make test`` installs, so a test that cannot run there is a broken CI, not a pass. ``requires(reason)``
is the same as a mark, for a module's ``pytestmark`` or one test: tests/conftest.py calls
``require`` before the test's fixtures are set up.

A test that cannot run in CI for a reason CI cannot fix (there is no GPU) gives a reason that starts
with one of ``ALLOWED``: it skips in CI too, and is listed as such. At the end of a CI session
tests/conftest.py fails the run when a test was skipped, or marked xfail, for any other reason
(``pytest.skip`` or ``importorskip`` called directly, an empty parameter list, a leftover xfail).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The only reasons a test may give for not running in CI, each a prefix of the skip reason.
ALLOWED = (
    "needs an NVIDIA GPU",  # tests marked gpu: the CUDA checkpoint API needs the hardware
    "runs on the GPU machine",  # bench/gpu's own code, with the torch and safetensors installed there
)


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def allowed(reason: str) -> bool:
    """Whether ``reason`` is one a test may skip for in CI."""
    return reason.startswith(ALLOWED)


def require(reason: str | None) -> None:
    """Skip with ``reason``; in CI (``CI=true``) fail instead, unless the reason is ``ALLOWED``."""
    if reason is None:
        return
    if in_ci() and not allowed(reason):
        pytest.fail(f"CI=true and this test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def requires(reason: str | None) -> pytest.MarkDecorator:
    """``require(reason)`` as a mark (``pytestmark = [requires(why())]``); evaluated once, at import."""
    return pytest.mark.requires(reason)


def has_gpu() -> bool:
    """An NVIDIA driver is loaded here (what the ``gpu`` mark needs)."""
    return Path("/proc/driver/nvidia/version").exists()


def root(what: str) -> str | None:
    """``"needs root (WHAT)"`` when this process is not root, else None: for ``require``."""
    return None if os.geteuid() == 0 else f"needs root ({what})"


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str | None:
    """Why a report was skipped or xfailed (pytest's own words), or None when it was not."""
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    if not report.skipped:
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
