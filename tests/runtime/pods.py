"""The pod sandbox of the CRIU tests: it lives in :mod:`thaw.dev.sandbox` (``thaw demo`` and
bench/runtime_cpu.py use it too); these names are re-exported for the tests. Also here: a memory
cgroup with a limit, for the tests that need a container's memory limit."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from pathlib import Path

from tests.needs import require, root
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
    thaw_command,
    thaw_env,
    wait_for,
    with_caps,
    write_facts,
)
from thaw.runtime.room import CGROUP_ROOT, cgroup_paths

STATE_SERVER = STANDIN

__all__ = [
    "REPO",
    "RUNTIME_DEFAULT_CAPS",
    "STATE_SERVER",
    "THAW_CAPS",
    "Netns",
    "Pod",
    "in_cgroup",
    "memory_cgroup",
    "missing_prerequisites",
    "read_json",
    "thaw_cli",
    "thaw_command",
    "thaw_env",
    "wait_for",
    "with_caps",
    "write_facts",
]


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child of this process's memory cgroup (v1 or v2) limited to ``limit`` bytes, removed
    afterwards; where none can be made, ``require`` says why (in CI: fails)."""
    require(root("makes a memory cgroup"))
    v2, v1 = cgroup_paths(Path("/proc/self/cgroup").read_text())
    if v1 is not None and (CGROUP_ROOT / "memory").is_dir():
        base, limit_file = CGROUP_ROOT / "memory" / v1.lstrip("/"), "memory.limit_in_bytes"
    elif v2 is not None and (CGROUP_ROOT / "cgroup.controllers").is_file():
        base, limit_file = CGROUP_ROOT / v2.lstrip("/"), "memory.max"
    else:
        require("no memory cgroup controller is mounted here (v1 or v2)")
    child = base / f"thaw-test-{secrets.token_hex(3)}"
    try:
        child.mkdir()
        (child / limit_file).write_text(str(limit))
    except OSError as exc:
        with contextlib.suppress(OSError):
            child.rmdir()
        require(f"no memory cgroup can be made under {base}: {exc}")
    try:
        yield child
    finally:
        with contextlib.suppress(OSError):
            child.rmdir()


def in_cgroup(cgroup: Path) -> list[str]:
    """A command prefix that moves the rest of the command into ``cgroup`` before it starts."""
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh"]
