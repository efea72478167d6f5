"""The outcome copies in the node cache: ``<cache>/.outcomes/<pod uid>.json``, root-only like the
cache. ``thaw exec`` writes its pod's copy; the agent reads them all and posts Events
(:mod:`thaw.node.events`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

OUTCOMES_DIR = ".outcomes"  # in the node cache; a dot-entry, so never taken for a snapshot name
_UID = re.compile(r"^[0-9a-f][0-9a-f-]{0,63}$")  # Kubernetes UIDs are UUIDs


def outcome_copy_path(cache: Path, uid: str) -> Path:
    """Where a pod's copy goes; ValueError for a uid that is not a UUID (it names a file)."""
    if not _UID.match(uid):
        raise ValueError(f"pod uid {uid!r} is not a Kubernetes UID")
    return cache / OUTCOMES_DIR / f"{uid}.json"


def write_outcome_copy(cache: Path, uid: str, data: bytes) -> None:
    """Atomically replace this pod's copy (root-only directory, like the cache)."""
    dest = outcome_copy_path(cache, uid)
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = dest.parent / f".{uid}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, dest)
