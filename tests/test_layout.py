"""DESIGN.md's "Layout", enforced: what each room of the code may import.

Every module of ``thaw/``, ``webhook/`` and ``extender/`` is parsed, and every import it makes is
checked: at the top, inside a function (lazy), ``from PACKAGE import MODULE``, relative imports, and
the ``"module:function"`` strings a server or command is loaded by. Nothing below ``thaw/cli.py``
imports it; nothing shipped imports ``thaw.dev`` (it is left out of the runtime bundle); the
workload's wrapper (``thaw.runtime``) and the pure contract never import Flask, gunicorn or the
Kubernetes client (they run in every workload pod). The rules are checked against a module written
to break each, so the walk itself cannot pass by finding nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("thaw", "webhook", "extender")
ANYTHING = frozenset({"*"})  # any room, but only thaw.cli and thaw.__main__ import thaw.cli

# room -> the rooms it may import (its own always), as DESIGN.md's table says.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "thaw": frozenset(),  # the package's __init__: a docstring and the version
    "thaw.errors": frozenset(),
    "thaw.cli": ANYTHING,
    "thaw.__main__": frozenset({"thaw.cli"}),
    "thaw.contract": frozenset({"thaw.errors"}),
    "thaw.snapshot": frozenset({"thaw.contract", "thaw.errors"}),
    "thaw.runtime": frozenset({"thaw.contract", "thaw.snapshot", "thaw.errors"}),
    "thaw.node": frozenset({"thaw.contract", "thaw.snapshot", "thaw.errors"}),
    "thaw.check": frozenset({"thaw.contract", "thaw.snapshot", "thaw.runtime", "thaw.node", "thaw.errors"}),
    "thaw.serve": frozenset({"thaw.contract", "thaw.errors"}),
    "thaw.dev": ANYTHING,  # but thaw.cli: nothing below the CLI imports it
    "webhook": frozenset({"thaw.contract", "thaw.serve", "thaw.errors"}),
    "extender": frozenset({"thaw.contract", "thaw.serve", "thaw.errors"}),
}
# One module's own exception, named in DESIGN.md: the extender's dev launcher waits for readiness.
MODULE_MAY_IMPORT = {"extender.launch": frozenset({"thaw.runtime.ready"})}
# Third-party packages a room must not import (it runs in every workload pod, or is pure).
MUST_NOT_IMPORT = {
    "thaw.contract": ("flask", "gunicorn", "kubernetes"),
    "thaw.runtime": ("flask", "gunicorn", "kubernetes"),
}
SPEC = re.compile(r"^((?:thaw|webhook|extender)(?:\.\w+)*):\w+$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str | None:
    """The room of a module of ours (``thaw.runtime``, ``thaw.cli``, ``webhook``), or None."""
    parts = module.split(".")
    if parts[0] in ("webhook", "extender"):
        return parts[0]
    if parts[0] != "thaw":
        return None
    return "thaw" if len(parts) == 1 else f"thaw.{parts[1]}"


def imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in ``source``, at any depth; ``from X import Y``
    gives X and X.Y (Y may be a module); ``"pkg.mod:attr"`` strings give pkg.mod."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := SPEC.match(node.value)):
            yield node.lineno, m.group(1)


def allowed(importer: str, imported: str) -> bool:
    here, there = room(importer), room(imported)
    # Not ours, the same room, or the bare package (its __init__ imports nothing: for thaw.__file__).
    if there is None or there in (here, "thaw"):
        return True
    if any(imported == m or imported.startswith(f"{m}.") for m in MODULE_MAY_IMPORT.get(importer, ())):
        return True
    rule = MAY_IMPORT[here] if here is not None else ANYTHING
    if "*" in rule:
        return there != "thaw.cli" or here == "thaw.cli"
    return there in rule


def problems(source: str, module: str, is_package: bool = False) -> list[str]:
    """What ``module`` (whose code is ``source``) imports against the rules, one line each."""
    found = []
    here = room(module)
    for line, imported in imports(source, module, is_package):
        if not allowed(module, imported):
            found.append(
                f"{module}:{line} imports {imported} ({here} may import {sorted(MAY_IMPORT[here or ''])})"
            )
        if here != "thaw.dev" and room(imported) == "thaw.dev" and here != "thaw.cli":
            found.append(f"{module}:{line} imports {imported}: thaw/dev is not in the runtime bundle")
        banned = MUST_NOT_IMPORT.get(here or "", ())
        if imported.split(".")[0] in banned:
            found.append(f"{module}:{line} imports {imported}: {here} never imports {', '.join(banned)}")
    return found


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_keeps_to_its_room() -> None:
    files = sources()
    assert len(files) >= 80, files  # every room is walked
    found = [
        problem
        for path in files
        for problem in problems(path.read_text(), module_name(path), path.name == "__init__.py")
    ]
    assert found == [], "\n".join(found)


def test_every_room_is_known() -> None:
    rooms = {room(module_name(p)) for p in sources()}
    assert rooms <= set(MAY_IMPORT), rooms - set(MAY_IMPORT)


@pytest.mark.parametrize(
    ("module", "source", "words"),
    [
        ("thaw.runtime.execute", "def f():\n    from thaw.cli import main\n", "imports thaw.cli"),
        ("thaw.snapshot.fetch", "from thaw import cli\n", "imports thaw.cli"),
        ("thaw.dev.demo", "import thaw.cli\n", "imports thaw.cli"),
        ("thaw.contract.plan", "from ..runtime import criu\n", "imports thaw.runtime"),
        ("thaw.errors", "import thaw.contract.plan\n", "imports thaw.contract.plan"),
        ("thaw.serve.tls", "from thaw.snapshot.cache import x\n", "imports thaw.snapshot.cache"),
        ("thaw.node.agent", "from thaw.runtime.criu import tree\n", "imports thaw.runtime.criu"),
        ("webhook.mutate", "from extender import scoring\n", "imports extender"),
        ("extender.handlers", "from thaw.runtime.ready import x\n", "imports thaw.runtime.ready"),
        ("extender.app", "APP = 'webhook.app:create_app'\n", "imports webhook.app"),
        ("thaw.runtime.restore", "def f():\n    import kubernetes\n", "never imports flask"),
        ("thaw.check.node", "from thaw.dev.sandbox import Pod\n", "not in the runtime bundle"),
    ],
)
def test_the_rules_catch_each_way_to_break_them(module: str, source: str, words: str) -> None:
    found = problems(source, module)
    assert any(words in p for p in found), found


def test_what_the_rules_allow() -> None:
    assert problems("from thaw.runtime.ready import wait_ready\n", "extender.launch") == []
    assert problems("from . import criu\nfrom .criu import tree\n", "thaw.runtime.execute") == []
    assert problems("def f():\n    from thaw.runtime import criu\n", "thaw.check.node") == []
    assert problems("import importlib\nCOMMANDS = {'demo': 'thaw.dev.demo:run'}\n", "thaw.cli") == []
