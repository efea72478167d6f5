"""``thaw fetch``: the ``thaw-fetch`` init container. Picks the snapshot to restore and stages it.

Choice: among the snapshots the store lists under the pod's (namespace, name), those of the pod's
workload hash whose ``compat`` equals this node's key, newest first by ``min(created, stored_at)``
(the signer chooses ``created``, the store records ``stored_at``: a forged future time cannot put a
snapshot first), a ``created`` more than MAX_FUTURE_S ahead refused outright; the first that
verifies (signature against the trust directory, then every chunk's sha256 while copying into the
node cache) wins, and is pinned for the pod (``--pod-uid``) until its ``thaw exec`` holds it.

Every problem becomes a ``cold`` plan whose reason starts with a stable category (``no snapshot``,
``incompatible``, ``untrusted``, ``digest mismatch``, ``cache full``, ``store unreadable``,
``deadline``, ...), and the command exits 0: a pod must never fail because its snapshot could not be
used. The command works in a child process under an overall deadline (``--deadline``): past it the
child is killed, its temporary copy removed, and the plan is cold with what it was doing; nothing
hangs the init container, whatever the store, the cache or a co-tenant holding a lock does. Beside
the plan it writes ``facts.json``: the node facts it used, which every Thaw container of the pod
reads (thaw.contract.facts.read_facts_file).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from thaw.contract.annotations import is_dns1123_label
from thaw.contract.facts import NodeFacts, compat_key, facts_path, validate_facts, write_facts_file
from thaw.contract.manifest import Manifest, ManifestError, parse_created, verify_manifest
from thaw.contract.plan import Plan, cold_plan, parse_plan, restore_plan, write_plan
from thaw.contract.signing import TrustedKeys, load_trusted_keys
from thaw.snapshot.cache import (
    DEFAULT_NAMESPACE,
    PIN_INFIX,
    CacheBusy,
    CacheError,
    CacheFull,
    StderrProgress,
    human_bytes,
    name_dir,
    remove_dead_temps,
    stage,
    unpin,
)
from thaw.snapshot.nodefacts import facts_difference
from thaw.snapshot.store import Listing, Store, StoreError
from thaw.snapshot.stores import store_from_args
from thaw.snapshot.transfer import NO_DEADLINE, Deadline, DigestMismatch, TimedOut

log = logging.getLogger("thaw.fetch")

MAX_NAMED = 3  # how many alternatives a reason names before "and N more"
MAX_FUTURE_S = 300.0  # a manifest created further ahead than this is refused (clock skew allowance)
# 130 GB from a store at 500 MB/s (NFS, a registry) is 260 s; twice that, rounded up.
DEFAULT_DEADLINE_S = 600.0
KILL_GRACE_S = 5.0  # after the deadline, how long the child may take to write its own cold plan


def _listing(values: list[str]) -> str:
    shown = ", ".join(values[:MAX_NAMED])
    return shown + (f" and {len(values) - MAX_NAMED} more" if len(values) > MAX_NAMED else "")


def _incompatible_reason(name: str, facts: NodeFacts, candidates: list[Manifest]) -> str:
    key = compat_key(facts)
    newest = candidates[0]
    return (
        f"incompatible: {len(candidates)} snapshot(s) of {name} for this workload, none taken on a node "
        f"like this one (compat {key}); newest {newest['id'][:19]}…: "
        f"{facts_difference(facts, newest['facts'], newest['compat'])}"
    )


def order_key(listed: Listing) -> tuple[float, str]:
    """Newest first by ``min(created, stored_at)``: a time the signer alone cannot push forward."""
    created = parse_created(listed.manifest["created"])
    when = created if listed.stored_at is None else min(created, listed.stored_at)
    return when, listed.manifest["id"]


def choose(
    listed: Sequence[Listing], name: str, workload: str, facts: NodeFacts, now: float
) -> tuple[list[Manifest], str | None]:
    """The candidates to try, newest first, or the cold reason when there are none. Pure."""
    if not listed:
        return [], f"no snapshot: none published under {name!r} yet"
    same_workload = [x for x in listed if x.manifest["workload"] == workload]
    if not same_workload:
        others = sorted({x.manifest["workload"] for x in listed})
        return [], (
            f"no snapshot for this workload: {len(listed)} snapshot(s) of {name!r} exist, for workload(s) "
            f"{_listing(others)}, not {workload} (image, command, env or resources differ)"
        )
    same_workload.sort(key=order_key, reverse=True)
    key = compat_key(facts)
    compatible = [x for x in same_workload if x.manifest["compat"] == key]
    if not compatible:
        return [], _incompatible_reason(name, facts, [x.manifest for x in same_workload])
    future = [x for x in compatible if parse_created(x.manifest["created"]) > now + MAX_FUTURE_S]
    for x in future:
        log.warning("not restoring %s: created %s is in the future", x.manifest["id"], x.manifest["created"])
    usable = [x.manifest for x in compatible if x not in future]
    if not usable:
        newest = future[0].manifest
        return [], (
            f"malformed manifest: created in the future: {len(future)} snapshot(s) of {name}, newest "
            f"{newest['id'][:19]}… created {newest['created'][:40]}, more than {MAX_FUTURE_S:.0f} s ahead "
            "of this node's clock"
        )
    return usable, None


_CATEGORY = {
    "unsigned": "unsigned",
    "no-trusted-keys": "untrusted",
    "untrusted-key": "untrusted",
    "bad-signature": "bad signature",
    "id-mismatch": "tampered manifest",
    "malformed": "malformed manifest",
}


def fetch(  # noqa: PLR0917  (the documented signature)
    store: Store,
    cache_dir: Path,
    name: str,
    workload: str,
    trust_dir: Path | None,
    facts: NodeFacts,
    allow_unsigned: bool = False,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    budget: int | None = None,
    show_progress: bool = True,
    deadline: Deadline = NO_DEADLINE,
    pod_uid: str | None = None,
    on_phase: Any = None,
) -> Plan:
    """Stage the snapshot this pod should restore and return the plan. Never raises.

    ``deadline``: checked between reads and on every lock wait (a cold plan when it passes; the
    ``thaw fetch`` command also kills a fetch that does not return by then). ``pod_uid``: pin the
    staged snapshot for this pod. ``on_phase(text)``: told what the fetch is doing (for the reason
    a killed fetch gets)."""
    phase = on_phase if callable(on_phase) else (lambda _text: None)
    try:
        return _fetch(
            store=store,
            cache_dir=cache_dir,
            namespace=namespace,
            name=name,
            workload=workload,
            trust_dir=trust_dir,
            facts=facts,
            allow_unsigned=allow_unsigned,
            budget=budget,
            show_progress=show_progress,
            deadline=deadline,
            pod_uid=pod_uid,
            phase=phase,
        )
    except TimedOut as exc:
        return cold_plan(f"deadline: {exc}")
    except Exception as exc:  # the init container must never fail the pod
        log.debug("fetch failed", exc_info=True)
        return cold_plan(f"internal error: {type(exc).__name__}: {exc}")


def _fetch(
    *,
    store: Store,
    cache_dir: Path,
    namespace: str,
    name: str,
    workload: str,
    trust_dir: Path | None,
    facts: NodeFacts,
    allow_unsigned: bool,
    budget: int | None,
    show_progress: bool,
    deadline: Deadline,
    pod_uid: str | None,
    phase: Any,
) -> Plan:
    if not is_dns1123_label(name):
        return cold_plan(f"invalid name: snapshot name {name!r} is not a DNS-1123 label")
    if not is_dns1123_label(namespace):
        return cold_plan(f"invalid namespace: {namespace!r} is not a DNS-1123 label")
    problems: list[str] = []
    phase(f"listing {namespace}/{name} in the store {store.describe()}")
    try:
        listed = store.list_snapshots(namespace, name, problems)
    except StoreError as exc:
        return cold_plan(f"store unreadable: {exc}")
    for p in problems:
        log.warning("skipped store entry: %s", p)
    deadline.check("listing the store")
    candidates, why = choose(listed, name, workload, facts, time.time())
    if why is not None:
        if problems and not listed:
            why += f" ({len(problems)} unreadable store entries, first: {problems[0]})"
        return cold_plan(why)

    trusted = load_trusted_keys(trust_dir)
    for p in trusted.problems:
        log.warning("trust directory: %s", p)
    failures: list[str] = []
    for m in candidates:
        outcome = _attempt(
            store,
            m,
            cache_dir,
            namespace,
            trusted,
            allow_unsigned,
            budget,
            show_progress,
            deadline,
            pod_uid,
            phase,
        )
        if not isinstance(outcome, str):
            return outcome
        log.warning("not restoring %s: %s", m["id"], outcome)
        failures.append(outcome)
    more = f" ({len(failures) - 1} older candidate(s) also failed)" if len(failures) > 1 else ""
    return cold_plan(failures[0] + more)


def _attempt(  # noqa: PLR0917
    store: Store,
    m: Manifest,
    cache_dir: Path,
    namespace: str,
    trusted: TrustedKeys,
    allow_unsigned: bool,
    budget: int | None,
    show_progress: bool,
    deadline: Deadline,
    pod_uid: str | None,
    phase: Any,
) -> Plan | str:
    """Verify and stage one candidate: its plan (restore, or cold when the cache is full or the
    deadline passed, which an older candidate would not cure), or why this candidate cannot be used."""
    try:
        note = verify_manifest(m, trusted, allow_unsigned)
    except ManifestError as exc:
        return f"{_CATEGORY[exc.kind]}: {exc}"
    (log.warning if "accepted because" in note else log.info)("%s", note)
    sig = m.get("signature")
    # The key the signature verified with, recorded beside the staged copy (the agent advertises
    # only snapshots whose signature verifies against it); none for one accepted by the opt-out.
    signer = trusted.keys.get(sig["key_id"]) if sig is not None and "accepted because" not in note else None
    progress = (
        StderrProgress(f"thaw fetch {m['name']} {m['id'][7:19]}", m["total_bytes"]) if show_progress else None
    )
    copied = [0]

    def counting(n: int) -> None:
        copied[0] += n
        if progress is not None:
            progress(n)

    waiting = functools.partial(log.info, "another fetch of %s is staging it here; waiting", m["id"])
    phase(f"staging {m['id']} ({human_bytes(m['total_bytes'])})")
    t0 = time.monotonic()
    try:
        path = stage(
            store,
            m,
            cache_dir,
            counting,
            namespace=namespace,
            signer=signer,
            budget=budget,
            deadline=deadline,
            on_wait=waiting,
            pod_uid=pod_uid,
        )
    except CacheFull as exc:
        return cold_plan(str(exc))
    except TimedOut as exc:
        return cold_plan(
            f"deadline: {exc} ({human_bytes(copied[0])} of {human_bytes(m['total_bytes'])} copied)"
        )
    except CacheBusy as exc:
        return cold_plan(f"cache busy: {exc}")
    except DigestMismatch as exc:
        return f"digest mismatch: snapshot {m['id']}: {exc}"
    except StoreError as exc:
        return f"store unreadable: snapshot {m['id']}: {exc}"
    except CacheError as exc:
        return f"cache error: {exc}"
    except OSError as exc:
        return f"cache error: {exc.strerror or exc} ({exc.filename or cache_dir})"
    if progress is not None and progress.done:
        progress.finish()
    # bytes 0: the snapshot was in the node cache already (a hit), for the agent's metrics.
    return restore_plan(path, m["id"], {"bytes": copied[0], "seconds": round(time.monotonic() - t0, 3)})


# --- the command: a child that works, a parent that keeps the deadline -----------------------------


@dataclass
class _Report:
    facts: NodeFacts | None = None
    plan: Plan | None = None
    phase: str = "starting"


def _send(fd: int, value: dict[str, Any]) -> None:
    data = orjson.dumps(value) + b"\n"
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def _child(args: argparse.Namespace, out: int, deadline: Deadline) -> None:
    from thaw.snapshot.nodefacts import node_facts

    _send(out, {"phase": "detecting the node's facts"})
    try:
        facts = node_facts(args.facts)
    except Exception as exc:  # unreadable --facts, broken NVML: cold, never a failed pod
        _send(out, {"plan": cold_plan(f"node facts: {exc}")})
        return
    _send(out, {"facts": facts})
    try:
        store = store_from_args(args)
    except ValueError as exc:  # a bad --store or --registry-* value: cold, never a failed pod
        _send(out, {"plan": cold_plan(f"store unusable: {exc}")})
        return
    plan = fetch(
        store,
        args.cache,
        args.name,
        args.workload,
        args.trust,
        facts,
        allow_unsigned=bool(getattr(args, "allow_unsigned", False)),
        namespace=getattr(args, "namespace", None) or DEFAULT_NAMESPACE,
        budget=getattr(args, "budget", None),
        deadline=deadline,
        pod_uid=getattr(args, "pod_uid", None) or None,
        on_phase=lambda text: _send(out, {"phase": text}),
    )
    _send(out, {"plan": plan})


def _collect(fd: int, until: float) -> _Report:
    """Read the child's reports until it sends its plan, closes the pipe, or ``until`` passes."""
    report, buf = _Report(), b""
    while report.plan is None:
        left = until - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "phase" in msg:
                report.phase = str(msg["phase"])
            if "facts" in msg:
                with contextlib.suppress(ValueError):
                    report.facts = validate_facts(msg["facts"])
            if "plan" in msg:
                report.plan = parse_plan(orjson.dumps(msg["plan"]))
    return report


def _after_kill(args: argparse.Namespace) -> None:
    """After killing the child: the temporary copies it left (their flock died with it), and its
    pins (the plan is cold: nothing will use the snapshot for this pod)."""
    with contextlib.suppress(Exception):
        nd = name_dir(args.cache, getattr(args, "namespace", None) or DEFAULT_NAMESPACE, args.name)
        remove_dead_temps(nd)
        uid = getattr(args, "pod_uid", None)
        if uid:
            for p in nd.glob(f"*{PIN_INFIX}{uid}"):
                unpin(nd / p.name.split(PIN_INFIX, 1)[0], uid)


def run(args: argparse.Namespace) -> int:
    """``thaw fetch``: write facts.json and the plan; exit 0 whatever the outcome (cold is an
    outcome, not a failure)."""
    # A plan or facts left by an earlier attempt of this init container must not outlive this one.
    for stale in (args.plan, facts_path(args.plan)):
        with contextlib.suppress(OSError):
            stale.unlink(missing_ok=True)
    seconds = float(getattr(args, "deadline", None) or DEFAULT_DEADLINE_S)
    deadline = Deadline.after(seconds)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the whole fetch; the parent writes the files
        os.close(read_end)
        code = 0
        try:
            _child(args, write_end, deadline)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    report = _collect(read_end, time.monotonic() + seconds + KILL_GRACE_S)
    os.close(read_end)
    plan = report.plan
    if plan is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            plan = cold_plan(
                f"deadline: thaw fetch did not finish within {seconds:.0f} s (it was {report.phase})"
            )
        else:
            plan = cold_plan(f"internal error: the fetch ended without a plan (it was {report.phase})")
        _after_kill(args)
    else:
        os.waitpid(pid, 0)
    if report.facts is not None:
        try:
            write_facts_file(facts_path(args.plan), report.facts)
        except OSError as exc:
            sys.stderr.write(
                f"thaw fetch: cannot write facts {facts_path(args.plan)}: {exc.strerror or exc}\n"
            )
    try:
        write_plan(args.plan, plan)
    except OSError as exc:
        # thaw exec reads a missing plan as cold: still not a reason to fail the pod.
        sys.stderr.write(f"thaw fetch: cannot write plan {args.plan}: {exc.strerror or exc}\n")
    if plan["action"] == "restore":
        sys.stderr.write(f"thaw fetch: restore {plan['snapshot']} from {plan['path']}\n")
    else:
        sys.stderr.write(f"thaw fetch: cold start: {plan['reason']}\n")
    return 0
