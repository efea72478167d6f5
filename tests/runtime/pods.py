"""The pod sandbox of the CRIU tests: it lives in :mod:`thaw.dev.sandbox` (``thaw demo`` and
bench/runtime_cpu.py use it too); these names are re-exported for the tests."""

from __future__ import annotations

from thaw.dev.sandbox import (
    REPO,
    RUNTIME_DEFAULT_CAPS,
    STANDIN,
    THAW_CAPS,
    Netns,
    Pod,
    missing_prerequisites,
    read_json,
    thaw_cli,
    wait_for,
    with_caps,
    write_facts,
)

STATE_SERVER = STANDIN

__all__ = [
    "REPO",
    "RUNTIME_DEFAULT_CAPS",
    "STATE_SERVER",
    "THAW_CAPS",
    "Netns",
    "Pod",
    "missing_prerequisites",
    "read_json",
    "thaw_cli",
    "wait_for",
    "with_caps",
    "write_facts",
]
