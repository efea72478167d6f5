"""mkdocs hook: links from a docs page to a file of the repository (``../thaw/cli.py``) work on the
site as they do on a Git forge's file view.

A relative link that leaves ``docs/`` must name a file of the repository; the hook copies that file
into the site under ``repo/`` and points the link there, so the built site needs no forge URL and a
link to a file that does not exist fails ``mkdocs build --strict`` like a broken page link. Markdown
files linked this way (DESIGN.md, CHANGELOG.md) become pages of the site, their own links followed
the same way. A directory cannot be copied: name it in code instead of linking it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files, InclusionLevel

PREFIX = "repo"
# [text](target) or [text](target#anchor); the target has no spaces and no scheme.
LINK = re.compile(r"(?<=\]\()(?P<target>[^)\s#:]+)(?P<anchor>#[^)\s]*)?(?=\))")
FENCE = re.compile(r"^\s*(```|~~~)")


def _outside_code(text: str) -> list[str]:
    """The lines of ``text`` with fenced code blocks blanked (their links are not links)."""
    out: list[str] = []
    fenced = False
    for line in text.split("\n"):
        if FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def _source(f: File) -> Path:
    return Path(f.abs_src_path or "").resolve()


def on_files(files: Files, config: Any) -> Files:
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    todo = [_source(f) for f in files.documentation_pages()]
    seen: set[Path] = set(todo)
    while todo:
        page = todo.pop()
        where = page.relative_to(repo).as_posix()
        for line in _outside_code(page.read_text(encoding="utf-8")):
            for m in LINK.finditer(line):
                target = (page.parent / m.group("target")).resolve()
                if target.is_relative_to(docs):
                    continue
                if not target.is_relative_to(repo):
                    raise PluginError(f"{where}: link {m.group('target')!r} leaves the repository")
                if not target.is_file():
                    raise PluginError(
                        f"{where}: link {m.group('target')!r} names no file of the repository"
                        + (" (a directory: name it in code instead)" if target.is_dir() else "")
                    )
                uri = f"{PREFIX}/{target.relative_to(repo).as_posix()}"
                if files.get_file_from_path(uri) is None:
                    files.append(
                        File.generated(
                            config, uri, abs_src_path=str(target), inclusion=InclusionLevel.NOT_IN_NAV
                        )
                    )
                if target.suffix == ".md" and target not in seen:
                    seen.add(target)
                    todo.append(target)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Each link as the site has it: relative to where the page is in the site (a repository page
    sits under ``repo/``), to the docs page or to the copy under ``repo/``."""
    docs = Path(config["docs_dir"]).resolve()
    repo = docs.parent
    real = _source(page.file).parent
    virtual = (docs / page.file.src_uri).parent

    def swap(m: re.Match[str]) -> str:
        target = (real / m.group("target")).resolve()
        if not target.is_relative_to(docs):
            target = docs / PREFIX / target.relative_to(repo)
        return os.path.relpath(target, virtual) + (m.group("anchor") or "")

    lines = markdown.split("\n")
    code = _outside_code(markdown)
    return "\n".join(LINK.sub(swap, line) if kept else line for line, kept in zip(lines, code, strict=True))
