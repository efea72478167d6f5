"""The suite's rules against passing silently, tested themselves: ``require`` (tests/needs.py) skips
outside CI and fails in it unless the reason is allowed; a golden (tests/golden.py) is compared,
written only on request and never in CI, and fails when missing, stale or unused; the repository's
copy of the captured Kubernetes requests is a golden of ../shared/fixtures/k8s."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import golden
from tests.conftest import FIXTURES, REPO
from tests.needs import ALLOWED, allowed, require

SHARED_FIXTURES = REPO.parent / "shared" / "fixtures" / "k8s"


@pytest.mark.parametrize("ci", [False, True])
def test_require_skips_here_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch, ci: bool) -> None:
    monkeypatch.setenv("CI", "true" if ci else "false")
    require(None)  # nothing missing: the test runs
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception, match="needs a tool"):
        require("needs a tool")
    # A reason CI cannot fix skips in CI too (and the session check lets it through).
    with pytest.raises(pytest.skip.Exception):
        require(f"{ALLOWED[0]}: the CUDA checkpoint API")
    assert allowed(f"{ALLOWED[0]} (marked gpu)") and not allowed("needs root")


@pytest.fixture
def no_switch(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(golden.SWITCH, raising=False)
    monkeypatch.setenv("CI", "false")
    return monkeypatch


def test_a_golden_is_compared_and_never_written(tmp_path: Path, no_switch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "g.json"
    with pytest.raises(AssertionError, match="is missing"):
        golden.check_json(path, {"a": 1})
    assert not path.exists()
    path.write_text('{"a": 1}\n')
    golden.check_json(path, {"a": 1})
    with pytest.raises(AssertionError, match="is stale"):
        golden.check_json(path, {"a": 2})
    assert path.read_text() == '{"a": 1}\n'
    with pytest.raises(AssertionError, match="is stale"):
        golden.check_bytes(path, b'{"a": 1}')


def test_the_switch_writes_and_skips_the_comparison(tmp_path: Path, no_switch: pytest.MonkeyPatch) -> None:
    no_switch.setenv(golden.SWITCH, "1")
    path = tmp_path / "g.json"
    with pytest.raises(pytest.skip.Exception, match="written: review the diff"):
        golden.check_json(path, {"b": [1, 2], "a": 1})
    assert path.read_text() == '{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}\n'
    no_switch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        golden.check_json(path, {"a": 3})
    assert "3" not in path.read_text()


def test_a_golden_no_case_produces_fails(tmp_path: Path) -> None:
    for name in ("a.json", "b.json", "c.txt"):
        (tmp_path / name).write_text("{}")
    golden.check_all_used(tmp_path, "*.json", ["a.json", "b.json"])
    with pytest.raises(AssertionError, match=r"\['b.json'\]"):
        golden.check_all_used(tmp_path, "*.json", ["a.json"])


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_the_fixtures_are_a_verbatim_copy_of_the_shared_captures() -> None:
    """tests/fixtures/k8s is kept so a clone tests without the workplace's shared folder; where that
    folder is there, the copy must be what it holds (``THAW_REGENERATE_GOLDENS=1`` copies it)."""
    require(None if SHARED_FIXTURES.is_dir() else f"{SHARED_FIXTURES} is not beside the repository")
    shared = _files(SHARED_FIXTURES)
    assert len(shared) >= 60, shared  # 4 AdmissionReviews, 4 ExtenderArgs, raw/, responses
    golden.check_files(FIXTURES, {name: (SHARED_FIXTURES / name).read_bytes() for name in shared})


def test_files_are_all_compared_and_an_extra_one_fails(tmp_path: Path, no_switch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "sub" / "b").write_bytes(b"2")
    golden.check_files(tmp_path, {"a": b"1", "sub/b": b"2"})
    with pytest.raises(AssertionError, match="sub/b is stale"):
        golden.check_files(tmp_path, {"a": b"1", "sub/b": b"3"})
    with pytest.raises(AssertionError, match=r"no case produces \(delete them\): \['sub/b'\]"):
        golden.check_files(tmp_path, {"a": b"1"})
    no_switch.setenv(golden.SWITCH, "1")
    with pytest.raises(pytest.skip.Exception, match="2 files written"):
        golden.check_files(tmp_path, {"a": b"x", "c": b"y"})
    assert _files(tmp_path) == ["a", "c", "sub/b"] and (tmp_path / "a").read_bytes() == b"x"
