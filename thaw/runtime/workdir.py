"""The pod's work emptyDir (``/run/thaw/work``, ``--work``): what ``thaw exec`` (the workload
container, untrusted) and ``thaw sidecar`` (the ``thaw-sidecar`` container) leave each other there.

    <work>/outcome.json            thaw exec: what happened (thaw.runtime.outcome); the sidecar relays it
                                   to <cache>/.outcomes/<pod uid>.json
    <work>/ready                   thaw exec: nothing of Thaw holds readiness back any more (written at once
                                   for a cold start, after CUDA is back for a restore): the webhook's
                                   startupProbe checks that it exists
    <work>/dump.log, restore.log   CRIU's logs
    <work>/dump/                   thaw exec's CRIU dump; the sidecar copies it into the cache and deletes it
    <work>/checkpoint.inprogress   thaw exec, before the dump: a container restarted while it exists does not
                                   checkpoint again (it was killed mid-checkpoint) and deletes the dead dump
    <work>/checkpoint.done         thaw exec, when a checkpoint that dumped has ended (JSON: its record): a
                                   restarted container does not checkpoint again
    <work>/sidecar.json            thaw sidecar: whether it will publish this pod's dump (and why not), and
                                   how many bytes the node cache can take; rewritten every few seconds
    <work>/publish-request.json    thaw exec: the dump is complete, publish it
    <work>/publish-result.json     thaw sidecar: what became of it (published, failed, refused)

Every JSON file is written whole (temporary file, then rename) and read bounded (no symlink, no
FIFO, regular files only, size-capped): each side treats the other's files as untrusted input.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.safeio import read_bounded, write_atomic

log = logging.getLogger("thaw.exec")

OUTCOME = "outcome.json"
READY = "ready"
DUMP = "dump"
INPROGRESS = "checkpoint.inprogress"
DONE = "checkpoint.done"
SIDECAR = "sidecar.json"
REQUEST = "publish-request.json"
RESULT = "publish-result.json"
DEFAULT_WORK = Path("/run/thaw/work")
MAX_JSON_BYTES = 1 << 20  # every exchanged file is a few hundred bytes; an outcome a few kB
FORMAT = 1


class Unreadable(ValueError):
    """An exchanged file is missing, not a regular file, too large, or not a JSON object."""


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path``, read bounded; FileNotFoundError when it does not exist,
    Unreadable (with the reason) for anything else that is wrong with it."""
    try:
        raw = read_bounded(path, max_bytes)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise Unreadable(exc.strerror or str(exc)) from None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Unreadable(f"{path} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path} holds {type(value).__name__}, not a JSON object")
    return value


def read_json_or_none(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    try:
        return read_json(path, max_bytes)
    except (FileNotFoundError, Unreadable):
        return None


def write_json(path: Path, value: Any, mode: int = 0o644) -> None:
    """Write ``value`` as JSON atomically (``safeio.write_atomic``): a reader sees the old file,
    none, or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path, orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n", mode=mode
    )


@dataclass(frozen=True)
class ReadyGate:
    """What keeps a restored server from being taken as ready before its GPU state is back (issue
    10.4), in one of two ways, chosen by ``thaw exec --ready-gate``:

    - ``file``: the restored tree runs at once; ``<work>/ready`` appears only once CUDA is back
      (and the server woken), at once for a cold start. The webhook's startupProbe checks the file,
      so kubelet runs no readiness probe before it exists.
    - ``stopped``: CRIU leaves the tree stopped (``--leave-stopped``); only the CUDA driver's restore
      thread of each CUDA process runs while its GPU memory comes back; then every process gets
      SIGCONT. Nothing of the server runs before its GPU state is back. The file is written too.
    """

    file: Path | None
    stopped: bool = False

    def reset(self) -> None:
        """A restarted container starts gated again (the file survives in the emptyDir)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.unlink(missing_ok=True)

    def open(self) -> None:
        if self.file is None:
            return
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.file.write_bytes(b"")
        except OSError as exc:  # the startupProbe then fails the pod's start: say why, loudly
            log.error("cannot write %s (the startupProbe waits for it): %s", self.file, exc)
