"""Thaw's errors: the root every command's own errors can share, and the usage error.

Below the command line nothing imports :mod:`thaw.cli`; a module that must say "called wrongly"
raises :class:`UsageError` from here, and ``thaw.cli.main`` turns it into exit code 2.
"""

from __future__ import annotations


class ThawError(Exception):
    """The root of Thaw's own errors."""


class UsageError(ThawError):
    """A command was called wrongly: exit code 2."""
