"""The outcome file of ``thaw exec`` (``outcome.json`` beside the plan unless ``--outcome``): what
happened and why (restored, or cold and the reason, with the relevant lines of CRIU's log; the
checkpoint's status), for people and for the agent.

It is rewritten atomically after every change, names the pod it belongs to (from the env the webhook
injects), and is copied into the node cache for the agent to post as Events. An earlier run's file
(the pod's emptyDir) tells a restarted container not to checkpoint again when a checkpoint had to
stop the workload.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("thaw.exec")

# The pod's identity, as the webhook injects it (downward API), so an outcome file read off a node
# (by the agent, an operator or an event) says which pod it belongs to.
POD_ENV = {
    "name": "THAW_POD_NAME",
    "namespace": "THAW_POD_NAMESPACE",
    "uid": "THAW_POD_UID",
    "node": "THAW_NODE_NAME",
    "container": "THAW_CONTAINER",
}


@dataclass
class Outcome:
    """What happened, for people and for the agent: written as JSON after every change."""

    path: Path | None
    data: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The node cache, where a copy goes for the agent to post as Events (thaw/node/events.py): with the
    # pod's uid only (a container the webhook did not inject has none).
    cache: Path | None = None
    copy_failed: bool = False

    def update(self, **values: Any) -> None:
        with self.lock:
            self.data.update(values)
            self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if self.path is not None:
                try:
                    write_json_atomic(self.path, self.data)
                except OSError as exc:
                    log.warning("cannot write outcome file %s: %s", self.path, exc)
            uid = self.data.get("pod", {}).get("uid")
            if self.cache is not None and uid:
                from thaw.snapshot.outcome_copy import write_outcome_copy

                try:
                    write_outcome_copy(self.cache, uid, orjson.dumps(self.data))
                except (OSError, ValueError) as exc:
                    if not self.copy_failed:  # once: every later update would fail the same way
                        log.warning("cannot leave the outcome in the node cache %s: %s", self.cache, exc)
                    self.copy_failed = True


def pod_identity(environ: Mapping[str, str]) -> dict[str, str]:
    """The pod's name, namespace, node and container from the injected env; only those set."""
    return {key: environ[var] for key, var in POD_ENV.items() if environ.get(var)}


def write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2) + b"\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_outcome(path: Path | None) -> dict[str, Any]:
    """The outcome file an earlier run of this container left (the pod's emptyDir), or {}."""
    if path is None:
        return {}
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def checkpoint_blocked(earlier: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint record for this run when an earlier run in this pod had to stop the workload
    to checkpoint it (so a restart would only do it again), else None."""
    ck = earlier.get("checkpoint")
    if not isinstance(ck, Mapping) or not ck.get("stopped_workload"):
        return None
    first = str(ck.get("first_reason") or ck.get("reason", ""))
    return {
        "status": "skipped",
        "reason": f"an earlier checkpoint in this pod had to stop the workload: {first}",
        "first_reason": first,
        "stopped_workload": True,
    }
