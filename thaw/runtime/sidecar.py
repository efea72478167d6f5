"""``thaw sidecar``: the ``thaw-sidecar`` container (a native sidecar: an init container with
``restartPolicy: Always``), Thaw's image with no workload code in it (notes/POD-LAYOUT.md).

Two jobs, for the life of the pod:

- **Relay the outcome.** ``<work>/outcome.json`` (written by ``thaw exec``, so untrusted) is read
  bounded (``O_NOFOLLOW|O_NONBLOCK``, a regular file, at most MAX_OUTCOME_BYTES, a JSON object), its
  ``pod`` field replaced by this pod's identity from the sidecar's own env, and written to
  ``<cache>/.outcomes/<pod uid>.json`` for the agent's Events. A symlink, FIFO or huge file is
  refused, logged once, and never followed, opened for long or read whole.
- **Publish the pod's dump, once.** It answers ``thaw exec``'s requests (thaw.runtime.publish): the
  room question before the dump, then the publish itself: the dump in ``<work>/dump/`` is copied
  into the node cache hashing as it is copied, signed with ``--key`` as this pod's own snapshot
  (``THAW_POD_NAMESPACE``, ``--name``/``THAW_NAME``, ``--workload``/``THAW_WORKLOAD``: the webhook
  sets them on this container; a request names none of them), put in the store, and deleted. It
  publishes only when the plan (read-only for the workload) is cold, checkpointing is on and a key
  is mounted, and at most once per pod: ``<state>/publish.json`` in the sidecar's own emptyDir
  (``/run/thaw/state``), which the workload cannot write, records that it began. A restored
  replica's sidecar never publishes.

It exits 0 on SIGTERM (kubelet stops native sidecars after the workload), after a last relay; a
publish still running is abandoned (its flocked temporary directory in the cache is the agent's to
remove, and the state file keeps a restarted sidecar from publishing again).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.facts import NodeFacts
from thaw.contract.plan import read_plan
from thaw.runtime import workdir
from thaw.runtime.outcome import pod_identity
from thaw.runtime.publish import Target, cache_refusal, publish_and_record
from thaw.snapshot.outcome_copy import MAX_OUTCOME_BYTES, write_outcome_copy
from thaw.snapshot.store import Store

log = logging.getLogger("thaw.sidecar")

STATE_NAME = "publish.json"
MAX_REQUEST_BYTES = 4096
_REQUEST_ID = re.compile(r"^[0-9a-f]{8,64}$")
STEPS = ("room", "publish")


@dataclass
class SidecarConfig:
    work: Path
    plan: Path
    cache: Path
    state: Path
    store: Store | None
    key: Path | None
    name: str | None
    workload: str | None
    facts: Path | None
    checkpoint: str = "on-ready"
    # Why --store could not be opened (a registry auth Secret missing from the namespace): the
    # sidecar still relays outcomes and answers requests (a refusal naming it), never a crash loop
    # that would keep the workload from starting.
    store_problem: str | None = None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    interval: float = 0.5


def parse_request(value: dict[str, Any]) -> tuple[str, str, int] | str:
    """(id, step, bytes) of a request, or why it is not one (pure)."""
    rid, step, nbytes = value.get("id"), value.get("step"), value.get("bytes")
    if value.get("format") != workdir.FORMAT:
        return f"request format {value.get('format')!r}, not {workdir.FORMAT}"
    if not isinstance(rid, str) or not _REQUEST_ID.match(rid):
        return "request id must be 8 to 64 lower-case hex digits"
    if step not in STEPS:
        return f"request step {step!r} is not one of {', '.join(STEPS)}"
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
        return f"request bytes {nbytes!r} is not a byte count"
    return rid, step, nbytes


class Sidecar:
    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.pod = pod_identity(cfg.environ)
        self.stopping = threading.Event()
        self.relayed: bytes | None = None  # digest of the outcome last relayed
        self.said: set[str] = set()  # problems already logged (each once, not every pass)
        self.answered: str | None = None  # the id of the last request answered or being served
        self.publishing: threading.Thread | None = None

    def _once(self, level: int, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            log.log(level, "%s", message)

    # --- the outcome -------------------------------------------------------------------------

    def relay(self) -> None:
        """Copy the pod's outcome into the node cache when it changed (bounded read)."""
        uid = self.pod.get("uid")
        if not uid:
            self._once(logging.WARNING, "no THAW_POD_UID: the outcome is not relayed to the node cache")
            return
        try:
            value = workdir.read_json(self.cfg.work / workdir.OUTCOME, MAX_OUTCOME_BYTES)
        except FileNotFoundError:
            return
        except workdir.Unreadable as exc:
            self._once(logging.WARNING, f"outcome not relayed: {exc}")
            return
        value["pod"] = self.pod  # this pod's identity, whatever the workload wrote
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(data).digest()
        if digest == self.relayed:
            return
        try:
            write_outcome_copy(self.cfg.cache, uid, data)
        except (OSError, ValueError) as exc:
            self._once(logging.WARNING, f"outcome not relayed to {self.cfg.cache}: {exc}")
            return
        self.relayed = digest

    # --- publishing --------------------------------------------------------------------------

    def _state(self) -> dict[str, Any] | None:
        return workdir.read_json_or_none(self.cfg.state / STATE_NAME)

    def refusal(self) -> str | None:
        """Why this pod's dump is not published, or None (it would be)."""
        cfg = self.cfg
        if cfg.checkpoint != "on-ready":
            return f"checkpointing is off for this pod (thaw.dev/checkpoint: {cfg.checkpoint})"
        plan = read_plan(cfg.plan)
        if plan["action"] != "cold":
            return f"this pod was restored from {plan.get('snapshot')}: a restored replica never publishes"
        if cfg.key is None or not cfg.key.is_file():
            return f"no signing key mounted ({cfg.key or 'no --key'}): this pod publishes nothing"
        if cfg.store is None:
            if cfg.store_problem is not None:
                return f"store unusable: {cfg.store_problem}"
            return "no store configured (--store): this pod publishes nothing"
        missing = [
            what
            for what, v in (
                ("THAW_POD_NAMESPACE", self.pod.get("namespace")),
                ("--name/THAW_NAME", cfg.name),
                ("--workload/THAW_WORKLOAD", cfg.workload),
            )
            if not v
        ]
        if missing:
            return f"the sidecar lacks {', '.join(missing)}: it cannot tell whose snapshot this is"
        state = self._state()
        if state is not None or os.path.lexists(cfg.state / STATE_NAME):
            when = (state or {}).get("started", "earlier")
            return f"this pod already published once (began {when}, {(state or {}).get('status', 'unknown')})"
        return None

    def _room(self, nbytes: int) -> str | None:
        return self.refusal() or cache_refusal(self.cfg.cache, nbytes)

    def _answer(self, rid: str | None, step: str, **fields: Any) -> None:
        workdir.write_json(
            self.cfg.work / workdir.RESULT, {"format": workdir.FORMAT, "id": rid, "step": step, **fields}
        )

    def serve(self) -> None:
        """Answer a new request in ``<work>/publish-request.json``, if there is one."""
        path = self.cfg.work / workdir.REQUEST
        try:
            value = workdir.read_json(path, MAX_REQUEST_BYTES)
        except FileNotFoundError:
            return
        except workdir.Unreadable as exc:
            self._once(logging.WARNING, f"request refused: {exc}")
            with contextlib.suppress(OSError):
                path.unlink()  # never read again; thaw exec's wait for an answer ends on its deadline
            return
        parsed = parse_request(value)
        if isinstance(parsed, str):
            self._once(logging.WARNING, f"request refused: {parsed}")
            return
        rid, step, nbytes = parsed
        if rid == self.answered:
            return
        self.answered = rid
        if step == "room":
            why = self._room(nbytes)
            log.info("room for %d bytes: %s", nbytes, why or "yes")
            self._answer(rid, step, ok=why is None, **({"reason": why} if why else {}))
            return
        why = self._room(nbytes)
        if why is not None:
            log.warning("publish refused: %s", why)
            self._answer(rid, step, status="refused", reason=why)
            self._delete_dump()  # nothing will publish it
            return
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.cfg.state.mkdir(parents=True, exist_ok=True)
        workdir.write_json(self.cfg.state / STATE_NAME, {"status": "publishing", "started": started})
        self.publishing = threading.Thread(
            target=self._publish, args=(rid, nbytes, started), name="thaw-publish", daemon=True
        )
        self.publishing.start()

    def _publish(self, rid: str, nbytes: int, started: str) -> None:
        from thaw.snapshot.nodefacts import node_facts

        cfg = self.cfg
        assert cfg.store is not None and cfg.name and cfg.workload
        record: dict[str, Any]
        dump = cfg.work / workdir.DUMP
        why = _not_a_dump(dump)
        if why is not None:
            record = {"status": "failed", "reason": why}
        else:
            try:
                facts = node_facts(cfg.facts)
            except Exception as exc:  # recorded for thaw exec, never raised
                record = {"status": "failed", "reason": f"node facts: {exc}"}
            else:
                record = self._publish_as_this_pod(dump, nbytes, facts)
        log.info("publish: %s", record)
        with contextlib.suppress(OSError):
            workdir.write_json(cfg.state / STATE_NAME, {**record, "started": started})
        self._delete_dump()
        self._answer(rid, "publish", **record)

    def _publish_as_this_pod(self, dump: Path, nbytes: int, facts: NodeFacts) -> dict[str, Any]:
        cfg = self.cfg
        assert cfg.store is not None and cfg.name and cfg.workload
        target = Target(
            store=cfg.store,
            name=cfg.name,
            workload=cfg.workload,
            namespace=self.pod["namespace"],
            key=cfg.key,
            facts=facts,
            cache=cfg.cache,
        )
        # The cap: what the room question was answered for. A dump that grows past it while being
        # copied is refused, never allowed to fill the node's disk.
        return publish_and_record(dump, target, max_bytes=max(nbytes, 1))

    def _delete_dump(self) -> None:
        dump = self.cfg.work / workdir.DUMP
        with contextlib.suppress(OSError):
            if dump.is_symlink():
                dump.unlink()
            else:
                shutil.rmtree(dump)

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        refused = self.refusal()
        log.info(
            "pod %s: relaying %s; %s",
            self.pod.get("uid", "?"),
            self.cfg.work / workdir.OUTCOME,
            f"not publishing: {refused}" if refused else "will publish this pod's dump once",
        )
        while not self.stopping.is_set():
            self.relay()
            self.serve()
            self.stopping.wait(self.cfg.interval)
        self.relay()  # the workload's last word (its exit code)
        if self.publishing is not None and self.publishing.is_alive():
            log.warning("stopping while a publish runs: it is abandoned (this pod will not publish again)")
        return 0

    def stop(self, *_: object) -> None:
        self.stopping.set()


def _not_a_dump(dump: Path) -> str | None:
    """Why ``dump`` is not a dump directory of this pod's work emptyDir (itself a symlink, or not a
    directory), or None. What is under it is checked file by file by the ingest."""
    try:
        st = dump.lstat()
    except FileNotFoundError:
        return f"no dump in {dump}"
    except OSError as exc:
        return f"cannot read {dump}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{dump} is a symlink: refused (never followed)"
    if not stat.S_ISDIR(st.st_mode):
        return f"{dump} is not a directory: refused"
    return None


def run(args: argparse.Namespace) -> int:
    """``thaw sidecar``: relay the outcome and publish the pod's dump once, until SIGTERM."""
    from thaw.contract.facts import facts_path
    from thaw.snapshot.stores import store_from_args

    store, store_problem = None, None
    try:
        store = store_from_args(args) if args.store else None
    except ValueError as exc:
        store_problem = str(exc)
        log.error("store unusable, this pod publishes nothing: %s", exc)
    facts = args.facts if args.facts is not None else facts_path(args.plan)
    cfg = SidecarConfig(
        work=args.work,
        plan=args.plan,
        cache=args.cache,
        state=args.state,
        store=store,
        key=args.key,
        name=args.name,
        workload=args.workload,
        facts=facts if facts.is_file() else None,
        checkpoint=args.checkpoint,
        interval=float(args.interval),
        store_problem=store_problem,
    )
    sidecar = Sidecar(cfg)
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    code = sidecar.run()
    sys.stderr.flush()
    return code
