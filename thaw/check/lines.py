"""A check's result lines, their rendering and the exit code."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "warn", "FAIL"]


@dataclass(frozen=True)
class Line:
    """One check: what it looked at, whether it passed, what was found and, unless ok, what to do."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status != "ok" and not self.fix:
            raise ValueError(f"check line {self.name!r} is {self.status} without saying what to do")


def ok(name: str, detail: str) -> Line:
    return Line(name, "ok", detail)


def fail(name: str, detail: str, fix: str) -> Line:
    return Line(name, "FAIL", detail, fix)


def warn(name: str, detail: str, fix: str) -> Line:
    return Line(name, "warn", detail, fix)


def render(lines: Iterable[Line]) -> str:
    """One line per check (status, name, detail), the fix indented under it."""
    lines = list(lines)
    width = max((len(line.name) for line in lines), default=0)
    out: list[str] = []
    for line in lines:
        out.append(f"{line.status:<4}  {line.name:<{width}}  {line.detail}")
        if line.fix:
            out.append(f"{'':<4}  {'':<{width}}  -> {line.fix}")
    failed = sum(1 for line in lines if line.status == "FAIL")
    warned = sum(1 for line in lines if line.status == "warn")
    out.append(f"{len(lines)} checks: {len(lines) - failed - warned} ok, {warned} warnings, {failed} failed")
    return "\n".join(out) + "\n"


def exit_code(lines: Sequence[Line]) -> int:
    return 1 if any(line.status == "FAIL" for line in lines) else 0
