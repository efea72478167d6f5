"""The outcome file of ``thaw exec`` (``<work>/outcome.json`` unless ``--outcome``): what happened
and why (restored, or cold and the reason, with the relevant lines of CRIU's log; the checkpoint's
status), for people and for the agent.

It is rewritten atomically after every change and names the pod it belongs to (from the env the
webhook injects). In a pod, ``thaw-sidecar`` relays it into the node cache for the agent to post as
Events (thaw.runtime.sidecar); run by hand with ``--cache``, ``thaw exec`` leaves the copy itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from thaw.runtime.workdir import write_json

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
    # The node cache, where a copy goes for the agent to post as Events (thaw/node/events.py), when
    # thaw exec runs by hand with --cache; in a pod thaw-sidecar relays the file instead. With the
    # pod's uid only (a container the webhook did not inject has none).
    cache: Path | None = None
    copy_failed: bool = False

    def update(self, **values: Any) -> None:
        with self.lock:
            self.data.update(values)
            self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if self.path is not None:
                try:
                    write_json(self.path, self.data)
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
