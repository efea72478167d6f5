"""The fast-restore CRIU (scripts/build-criu-fast, scripts/criu/parallel-restore.patch) and its stock
fallback, with real CRIU: the fast build restores a few hundred MiB of private anonymous memory with
several readers to exactly the memory and mappings stock CRIU restores; ``thaw exec`` restores with
it where it is present and answers, and with stock CRIU where it is missing, broken, fails the
restore, or stock is asked for (``--criu-stock``), saying which in the outcome.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.criu_restore import dump, restore
from tests.needs import require, requires, root
from tests.runtime.pods import missing_prerequisites
from tests.runtime.test_exec_criu import (
    URL,
    Snapshot,
    _fetch,
    _restore_outcome,
    _run_pod,
    snapshot,
)
from thaw.runtime import criu

__all__ = ["snapshot"]  # the module-scoped fixture, taken from test_exec_criu: one checkpoint here

FAST = criu.REPO_CRIU_FAST
# A CRIU that answers --version and fails everything else (a restore included).
VERSION_ONLY = """#!/bin/sh
[ "$1" = --version ] && { echo "Version: 4.2.1"; exit 0; }
echo "Error (fake criu): no" >&2
exit 1
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _need_fast() -> None:
    require(None if os.access(FAST, os.X_OK) else f"no fast CRIU at {FAST} (make criu)")


# --- which binary restores (real files, no restore) --------------------------------------------


def test_fast_build_beside_stock_is_chosen_when_it_answers(tmp_path: Path) -> None:
    stock = _script(tmp_path / "criu", VERSION_ONLY)
    fast = _script(tmp_path / "criu-fast", VERSION_ONLY)
    assert criu.restore_criu(stock, env={}) == criu.RestoreCriu(fast, "fast")
    # --criu-stock (THAW_CRIU_STOCK): stock, and why
    forced = criu.restore_criu(stock, force_stock=True, env={})
    assert (forced.binary, forced.kind) == (stock, "stock") and "--criu-stock" in forced.note


def test_missing_or_broken_fast_build_falls_back_to_stock(tmp_path: Path) -> None:
    stock = _script(tmp_path / "criu", VERSION_ONLY)
    missing = criu.restore_criu(stock, env={})
    assert (missing.binary, missing.kind, missing.note) == (stock, "stock", "no fast CRIU")
    _script(tmp_path / "criu-fast", "#!/bin/sh\necho 'cannot load libnl-3.so.200' >&2\nexit 127\n")
    broken = criu.restore_criu(stock, env={})
    assert (broken.binary, broken.kind) == (stock, "stock")
    assert "does not run" in broken.note and "libnl" in broken.note
    (tmp_path / "criu-fast").write_bytes(b"\x7fELF not really")  # exec fails: ENOEXEC
    assert criu.restore_criu(stock, env={}).kind == "stock"
    # THAW_CRIU_FAST names it explicitly; one that is not there is said so
    gone = criu.restore_criu(stock, env={"THAW_CRIU_FAST": str(tmp_path / "nope")})
    assert gone.kind == "stock" and "THAW_CRIU_FAST" in gone.note


def test_checkout_fast_build_pairs_with_checkout_stock_only(tmp_path: Path) -> None:
    assert str(FAST) in criu.fast_candidates(str(criu.REPO_CRIU), {})
    other = str(tmp_path / "criu")
    assert criu.fast_candidates(other, {}) == [str(tmp_path / "criu-fast")]
    assert criu.fast_candidates(other, {"THAW_CRIU_FAST": "/x/criu"}) == ["/x/criu"]


# --- the patch itself: same memory, same mappings, several readers ------------------------------


@pytest.mark.criu
def test_fast_restore_reads_with_several_readers_into_the_same_memory(tmp_path: Path) -> None:
    require(root("CRIU"))
    require(None if os.access(criu.REPO_CRIU, os.X_OK) else "no stock CRIU (make criu)")
    _need_fast()
    # 320 MiB: 4 readers of >= 32 MiB each; the process (and each restored copy) gone within 5 min
    dumped = dump(str(criu.REPO_CRIU), 320, tmp_path, lifetime=300)
    stock = restore(str(criu.REPO_CRIU), dumped)
    fast = restore(str(FAST), dumped, {"CRIU_RESTORE_IO_WORKERS": "4"})
    one = restore(str(FAST), dumped, {"CRIU_RESTORE_IO_WORKERS": "1"})  # the stock read, in the fast build
    assert stock.digest == fast.digest == one.digest == dumped.digest
    assert (stock.readers, fast.readers, one.readers) == (1, 4, 1)
    # Every mapping at the same place with the same flags (VmFlags) and anonymous size.
    assert fast.layout == stock.layout == one.layout
    assert any(" rw-p " in line for line in fast.layout)


# --- thaw exec: which CRIU restored, and the fallback -------------------------------------------


@pytest.fixture
def restoring(snapshot: Snapshot, tmp_path: Path) -> Iterator[Path]:
    plan = _fetch(snapshot, snapshot.store, tmp_path)
    assert plan["action"] == "restore", plan
    yield tmp_path / "plan.json"


def _restored_with(plan: Path, env: dict[str, str] | None) -> dict[str, object]:
    ns, pod = _run_pod(plan, env)
    try:
        outcome = _restore_outcome(plan.parent, pod)
        assert outcome["result"] == "restored", f"{outcome}\n{pod.output}"
        state = ns.http("GET", f"{URL}/state")
        assert state is not None and state["counter"] == 2  # the snapshot's state
        return outcome
    finally:
        pod.stop()
        ns.delete()


@pytest.mark.criu
@requires(missing_prerequisites())
def test_thaw_exec_restores_with_the_fast_build(restoring: Path) -> None:
    _need_fast()
    outcome = _restored_with(restoring, None)
    assert outcome["criu"] == {"kind": "fast", "binary": str(FAST)}, outcome
    assert outcome["timings"]["criu_fast"] == 1  # type: ignore[index]


@pytest.mark.criu
@requires(missing_prerequisites())
def test_thaw_exec_restores_with_stock_when_asked(restoring: Path) -> None:
    _need_fast()
    outcome = _restored_with(restoring, {"THAW_CRIU_STOCK": "1"})
    used = outcome["criu"]
    assert isinstance(used, dict) and used["kind"] == "stock" and "--criu-stock" in used["note"], outcome
    assert outcome["timings"]["criu_fast"] == 0  # type: ignore[index]


@pytest.mark.criu
@requires(missing_prerequisites())
def test_fast_build_that_fails_the_restore_leaves_it_to_stock(restoring: Path, tmp_path: Path) -> None:
    fake = _script(tmp_path / "fails-restore", VERSION_ONLY)
    outcome = _restored_with(restoring, {"THAW_CRIU_FAST": fake})
    used = outcome["criu"]
    assert isinstance(used, dict) and used["kind"] == "stock", outcome
    assert used["note"].startswith("fast CRIU failed") and "fake criu" in used["note"]
    assert os.path.realpath(used["binary"]) == os.path.realpath(criu.REPO_CRIU)
