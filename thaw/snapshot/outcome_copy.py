"""The outcome copies in the node cache: ``<cache>/.outcomes/<pod uid>.json``, root-only like the
cache. The pod's publisher (``thaw sidecar``, or ``thaw exec`` run by hand with ``--cache``) writes
its pod's copy; the agent reads them all, bounded, and posts Events (:mod:`thaw.node.events`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.safeio import check_regular, open_dir, read_fd, write_atomic

OUTCOMES_DIR = ".outcomes"  # in the node cache; a dot-entry, so never taken for a namespace
MAX_OUTCOME_BYTES = 256 * 1024  # an outcome is a few kB; anything larger is not one
_UID = re.compile(r"^[0-9a-f][0-9a-f-]{0,63}$")  # Kubernetes UIDs are UUIDs


def outcome_copy_path(cache: Path, uid: str) -> Path:
    """Where a pod's copy goes; ValueError for a uid that is not a UUID (it names a file)."""
    if not _UID.match(uid):
        raise ValueError(f"pod uid {uid!r} is not a Kubernetes UID")
    return cache / OUTCOMES_DIR / f"{uid}.json"


def _outcomes_dir(cache: Path) -> Path:
    d = cache / OUTCOMES_DIR
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise OSError(errno.ENOTDIR, f"{d} is not a directory (a symlink?): refused", str(d))
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def write_outcome_copy(cache: Path, uid: str, data: bytes) -> None:
    """Atomically replace this pod's copy: written under an unpredictable name (mkstemp, O_EXCL)
    in the root-only directory, then renamed over the copy."""
    dest = outcome_copy_path(cache, uid)
    if len(data) > MAX_OUTCOME_BYTES:
        raise ValueError(f"outcome of pod {uid} has {len(data)} bytes, more than {MAX_OUTCOME_BYTES}")
    _outcomes_dir(cache)  # made root-only, and checked to be a directory
    write_atomic(dest, data)


def read_outcome_copies(
    cache: Path, max_age_s: float, now: float | None = None
) -> Iterator[tuple[str, dict[str, Any], float]]:
    """(pod uid, outcome, mtime) of every copy, read bounded: opened ``O_NOFOLLOW|O_NONBLOCK`` beneath the
    directory's descriptor, a regular file of at most MAX_OUTCOME_BYTES. Symlinks, FIFOs, other
    special files and oversized files are removed unread; copies (and a dead writer's temporaries)
    not updated for ``max_age_s`` are removed. A copy that is not a JSON object is skipped (one
    being replaced is read whole next time)."""
    now = time.time() if now is None else now
    try:
        dfd = open_dir(cache / OUTCOMES_DIR)
    except OSError:
        return
    try:
        for name in sorted(os.listdir(dfd)):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            stale = now - st.st_mtime > max_age_s
            copy = name.endswith(".json") and not name.startswith(".") and _UID.match(name[:-5])
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_OUTCOME_BYTES or stale:
                _unlink(dfd, name)  # never opened: a FIFO, a link to /dev/zero, a huge file
                continue
            if not copy:
                continue  # a writer's temporary
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            except OSError:
                _unlink(dfd, name)
                continue
            try:
                check_regular(fd, name, MAX_OUTCOME_BYTES)
                raw = read_fd(fd, MAX_OUTCOME_BYTES, name)
            except OSError:
                _unlink(dfd, name)
                continue
            finally:
                os.close(fd)
            try:
                outcome = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if isinstance(outcome, dict):
                yield name[:-5], outcome, st.st_mtime
    finally:
        os.close(dfd)


def remove_outcome_copy(cache: Path, uid: str) -> None:
    try:
        dfd = open_dir(cache / OUTCOMES_DIR)
    except OSError:
        return
    try:
        _unlink(dfd, outcome_copy_path(cache, uid).name)
    finally:
        os.close(dfd)


def _unlink(dfd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dfd)
