"""Handing a dump to its publisher (notes/POD-LAYOUT.md): ``thaw-sidecar`` in a pod, or ``thaw exec``
itself when run by hand with ``--store`` (and ``--key``). One function publishes in both:
:func:`thaw.snapshot.ingest.publish_dump` copies the dump into the node cache hashing as it copies
(what is hashed is what is stored), signs the manifest with the given identity, and puts it in the
store; :func:`publish_and_record` makes the checkpoint record of it.

``thaw exec`` talks to the sidecar through two files in the work emptyDir (thaw.runtime.workdir),
each written whole and read bounded, each request carrying a random id that its answer echoes:

    publish-request.json  {"format": 1, "id": HEX, "step": "room", "bytes": N}
    publish-result.json   {"format": 1, "id": HEX, "step": "room", "ok": true}
                          {"format": 1, "id": HEX, "step": "room", "ok": false, "reason": TEXT}
    publish-request.json  {"format": 1, "id": HEX, "step": "publish", "bytes": N}
    publish-result.json   {"format": 1, "id": HEX, "step": "publish", "status": "published",
                           "snapshot": ID, "bytes": N, "publish_s": S, "cached": true}
                          {"format": 1, "id": HEX, "step": "publish", "status": "failed"|"refused",
                           "reason": TEXT}

The room question comes before the dump: whether the sidecar would publish this pod's dump at
all (a restored replica's never, once per pod, a signing key mounted) and whether the node cache can
take ``bytes``. The dump lies in ``<work>/dump/``; the request names nothing else, and the sidecar
takes the snapshot's identity from its own environment, never from a request.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from thaw.contract.facts import NodeFacts
from thaw.runtime import workdir
from thaw.snapshot.store import Store

log = logging.getLogger("thaw.exec")

ANSWER_S = 30.0  # how long thaw exec waits for the sidecar's answer to the room question
PUBLISH_S = 6 * 3600.0  # a publish of hundreds of GB takes a while; this ends the wait on a dead sidecar
POLL_S = 0.2


class Publisher(Protocol):
    def room(self, nbytes: int) -> str | None:
        """Why a dump of about ``nbytes`` would not be published, or None."""
        ...

    def publish(self, dump: Path, nbytes: int) -> dict[str, Any]:
        """Publish the dump; the checkpoint record's fields (``status`` published, failed, refused)."""
        ...


@dataclass(frozen=True)
class Target:
    """Where and as whom a dump is published."""

    store: Store
    name: str
    workload: str
    namespace: str
    key: Path | None
    facts: NodeFacts
    cache: Path | None


def publish_and_record(dump: Path, target: Target, *, max_bytes: int | None = None) -> dict[str, Any]:
    """thaw.snapshot.ingest.publish_dump (the dump copied into the node cache hashed as it is
    copied, signed with ``target``'s identity and key, put in the store), as a checkpoint record.
    Never raises: the record says what became of it."""
    from thaw.snapshot.ingest import publish_dump

    t = time.monotonic()
    try:
        done = publish_dump(
            target.store,
            dump,
            cache_dir=target.cache,
            namespace=target.namespace,
            name=target.name,
            workload=target.workload,
            facts=target.facts,
            key=target.key,
            max_bytes=max_bytes,
        )
    except Exception as exc:  # whatever it was, the pod goes on: recorded, never raised
        log.error("publish of %s failed: %s", dump, exc)
        return {"status": "failed", "reason": f"publish: {exc}"}
    m = done.manifest
    log.info("published snapshot %s (%s bytes) to %s", m["id"], m["total_bytes"], target.store.describe())
    return {
        "status": "published",
        "snapshot": m["id"],
        "bytes": m["total_bytes"],
        "publish_s": round(time.monotonic() - t, 3),
        "cached": done.cached is not None,
    }


def cache_refusal(cache: Path, nbytes: int) -> str | None:
    """Why the node cache at ``cache`` cannot take a snapshot of ``nbytes``, or None: the room
    answer of both publishers."""
    from thaw.snapshot.cache import room_problem

    why = room_problem(cache, nbytes)
    return f"the node cache cannot take the snapshot: {why}" if why else None


@dataclass(frozen=True)
class LocalPublisher:
    """``thaw exec`` run by hand with ``--store``: publishes in-process."""

    target: Target

    def room(self, nbytes: int) -> str | None:
        return None if self.target.cache is None else cache_refusal(self.target.cache, nbytes)

    def publish(self, dump: Path, nbytes: int) -> dict[str, Any]:
        return publish_and_record(dump, self.target)


@dataclass(frozen=True)
class SidecarPublisher:
    """``thaw exec`` in a pod: asks ``thaw-sidecar`` through the work emptyDir."""

    work: Path
    answer_s: float = ANSWER_S
    publish_s: float = PUBLISH_S

    def _ask(self, step: str, nbytes: int, wait_s: float) -> dict[str, Any] | str:
        """Write a request and wait for its answer; the answer, or why there was none."""
        rid = secrets.token_hex(8)
        result = self.work / workdir.RESULT
        request = {"format": workdir.FORMAT, "id": rid, "step": step, "bytes": nbytes}
        try:
            result.unlink(missing_ok=True)
            workdir.write_json(self.work / workdir.REQUEST, request)
        except OSError as exc:
            return f"cannot write the request into {self.work}: {exc.strerror or exc}"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            answer = workdir.read_json_or_none(result)
            if answer is not None and answer.get("id") == rid and answer.get("step") == step:
                return answer
            time.sleep(POLL_S)
        return f"thaw-sidecar did not answer in {self.work / workdir.RESULT} within {wait_s:.0f} s"

    def room(self, nbytes: int) -> str | None:
        answer = self._ask("room", nbytes, self.answer_s)
        if isinstance(answer, str):
            return f"no publisher: {answer} (is the thaw-sidecar container running?)"
        if answer.get("ok") is True:
            return None
        return str(answer.get("reason") or "thaw-sidecar would not publish it (no reason given)")

    def publish(self, dump: Path, nbytes: int) -> dict[str, Any]:
        answer = self._ask("publish", nbytes, self.publish_s)
        if isinstance(answer, str):
            return {"status": "failed", "reason": answer}
        keys = ("status", "reason", "snapshot", "bytes", "publish_s", "cached")
        record: dict[str, Any] = {k: answer[k] for k in keys if k in answer}
        if record.get("status") not in ("published", "failed", "refused"):
            return {"status": "failed", "reason": f"thaw-sidecar answered {str(answer)[:200]}"}
        if record["status"] == "refused":
            record["status"] = "skipped"  # nothing failed: the publisher declined (its reason says why)
        return record
