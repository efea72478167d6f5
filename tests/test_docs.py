"""The documentation site (docs/, mkdocs.yml): it builds with ``mkdocs build --strict`` (broken page
links, missing anchors and links to repository files that do not exist fail it), every page is in
the navigation, the README's links land, every cold-start category the code writes is explained,
and every benchmark table says its machine, date and conditions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from markdown.extensions.toc import slugify

from tests.conftest import REPO
from thaw.node.metrics import COLD_CATEGORIES, RESTORE_FAILURES

DOCS = REPO / "docs"
CONFIG = REPO / "mkdocs.yml"
HOOK = DOCS / "hooks" / "repo_links.py"
LINK = re.compile(r"\]\((?P<target>[^)\s:]+)\)")  # relative links: no scheme
BUILD_TIMEOUT_S = 120


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )


class _Loader(yaml.SafeLoader):
    """mkdocs.yml names Python objects (``!!python/name:``) for mkdocs; here they are only names."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: suffix)


def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _headings(text: str) -> set[str]:
    """The anchors mkdocs (and a forge's Markdown view) gives the headings of ``text``."""
    fenced = False
    out = set()
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6} (.+)$", line)):
            out.add(slugify(m.group(1).replace("`", ""), "-"))
    return out


def _tables(text: str) -> list[tuple[str, list[str]]]:
    """(the section's heading, the header cells) of every table in ``text``."""
    section, found, previous = "", [], ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if line.startswith("| ---") and previous.startswith("|"):
            found.append((section, [c.strip() for c in previous.strip("|").split("|")]))
        previous = line
    return found


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    res = _mkdocs(CONFIG, site)
    assert res.returncode == 0, res.stdout + res.stderr
    for page in ("index.html", "install/index.html", "security/index.html", "benchmarks/index.html"):
        assert (site / page).is_file(), page
    # a repository file a page links to is in the site, as the page links it
    assert (site / "repo" / "thaw" / "contract" / "facts.py").read_bytes() == (
        REPO / "thaw" / "contract" / "facts.py"
    ).read_bytes()
    assert 'href="../repo/thaw/contract/facts.py"' in (site / "compatibility" / "index.html").read_text()


def test_a_link_to_a_missing_repository_file_fails_the_build(tmp_path: Path) -> None:
    """The hook's rule, on a project of its own: a link out of docs/ to an existing file is copied
    into the site (the control), one to a missing file or a directory stops the build."""
    docs = tmp_path / "docs"
    (docs / "hooks").mkdir(parents=True)
    shutil.copy(HOOK, docs / "hooks" / HOOK.name)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "real.py").write_text("x = 1\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        "site_name: t\ndocs_dir: docs\nexclude_docs: |\n  hooks/\nhooks:\n  - docs/hooks/repo_links.py\n"
    )
    (docs / "index.md").write_text("# T\n\n[real](../src/real.py)\n")
    res = _mkdocs(config, tmp_path / "site")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "repo" / "src" / "real.py").read_text() == "x = 1\n"
    for target, why in (("../src/gone.py", "names no file"), ("../src", "a directory")):
        (docs / "index.md").write_text(f"# T\n\n[x]({target})\n")
        res = _mkdocs(config, tmp_path / "site")
        assert res.returncode != 0 and why in res.stdout + res.stderr, (target, res.stdout + res.stderr)


def test_every_page_is_in_the_nav() -> None:
    config = yaml.load(CONFIG.read_text(), Loader=_Loader)  # a SafeLoader: python tags become names
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, f"not in nav: {set(pages) - set(nav)}; missing: {set(nav) - set(pages)}"


def test_readme_links_land() -> None:
    """The short README points into docs/: each relative link names a file that exists and, with
    an anchor, a heading of it."""
    text = (REPO / "README.md").read_text()
    targets = [m.group("target") for m in LINK.finditer(text)]
    assert sum(t.startswith("docs/") for t in targets) >= 15, targets
    for target in targets:
        path, _, anchor = target.partition("#")
        file = REPO / path
        assert file.exists(), f"README links {target}: no {path}"
        if anchor:
            assert anchor in _headings(file.read_text()), f"README links {target}: {path} has no such heading"


def test_every_cold_start_reason_the_code_writes_is_explained() -> None:
    """thaw fetch's and thaw exec's reason categories (the agent's metric labels) each have a row or
    a name in the cold-start page."""
    page = (DOCS / "cold-start-reasons.md").read_text()
    for category in COLD_CATEGORIES:
        assert f"`{category}:" in page or f"/ `{category}:`" in page, category
    for _, what in RESTORE_FAILURES:
        assert f"`{what}`" in page, what


def test_every_benchmark_table_says_its_machine_date_and_conditions() -> None:
    """Issue 16: a table of results carries conditions, machine and date columns, or its section
    states them (a date, a machine, and hit/miss, warm/churn or the runtime) in its text."""
    text = (DOCS / "benchmarks.md").read_text()
    sections = {
        m.group(1): m.group(2) for m in re.finditer(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    }
    tables = _tables(text)
    assert len(tables) >= 6, tables
    for section, header in tables:
        if {"conditions", "machine", "date"} <= set(header):
            continue
        prose = sections.get(section, "")
        assert re.search(r"20\d\d-\d\d-\d\d", prose), (section, header, "no date")
        assert re.search(r"H200|2-core", prose), (section, header, "no machine")
        assert re.search(r"hit|miss|warm|churn|bundled runtime|repository", prose, flags=re.I), (
            section,
            header,
            "no conditions",
        )


@pytest.mark.parametrize("name", ["LICENSE", "CHANGELOG.md", "SECURITY.md"])
def test_the_project_files_exist(name: str) -> None:
    text = (REPO / name).read_text()
    if name == "LICENSE":
        assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS" in text
    else:
        assert len(text.splitlines()) > 20
