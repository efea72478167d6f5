"""``thaw fetch``: the ``thaw-fetch`` init container. Picks the snapshot to restore and stages it.

Choice: among the snapshots published under the pod's name, those of the pod's workload hash whose
``compat`` equals this node's key, newest first; the first that verifies (signature against the
trust directory, then every file's size and sha256 while copying into the node cache) wins. Every
problem becomes a ``cold`` plan whose reason starts with a stable category (``no snapshot``,
``incompatible``, ``untrusted``, ``digest mismatch``, ``cache full``, ``store unreadable``, ...), and
the command exits 0: a pod must never fail because its snapshot could not be used.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from pathlib import Path

from thaw.contract.annotations import is_dns1123_label
from thaw.contract.facts import NodeFacts, compat_key
from thaw.contract.manifest import Manifest, ManifestError, verify_manifest
from thaw.contract.plan import Plan, cold_plan, restore_plan, write_plan
from thaw.contract.signing import TrustedKeys, load_trusted_keys
from thaw.snapshot.cache import CacheError, CacheFull, StderrProgress, stage
from thaw.snapshot.nodefacts import facts_difference
from thaw.snapshot.store import DigestMismatch, DirectoryStore, Store, StoreError

log = logging.getLogger("thaw.fetch")

MAX_LISTED = 3  # how many alternatives a reason names before "and N more"


def _listing(values: list[str]) -> str:
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


def _incompatible_reason(name: str, facts: NodeFacts, candidates: list[Manifest]) -> str:
    key = compat_key(facts)
    newest = candidates[0]
    return (
        f"incompatible: {len(candidates)} snapshot(s) of {name} for this workload, none taken on a node "
        f"like this one (compat {key}); newest {newest['id'][:19]}…: "
        f"{facts_difference(facts, newest['facts'])}"
    )


def choose(
    manifests: list[Manifest], name: str, workload: str, facts: NodeFacts
) -> tuple[list[Manifest], str | None]:
    """The candidates to try, newest first, or the cold reason when there are none. Pure."""
    if not manifests:
        return [], f"no snapshot: none published under {name!r} yet"
    same_workload = [m for m in manifests if m["workload"] == workload]
    if not same_workload:
        others = sorted({m["workload"] for m in manifests})
        return [], (
            f"no snapshot for this workload: {len(manifests)} snapshot(s) of {name!r} exist, for workload(s) "
            f"{_listing(others)}, not {workload} (image, command, env or resources differ)"
        )
    key = compat_key(facts)
    compatible = [m for m in same_workload if m["compat"] == key]
    if not compatible:
        return [], _incompatible_reason(name, facts, same_workload)
    compatible.sort(key=lambda m: (m["created"], m["id"]), reverse=True)
    return compatible, None


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
    budget: int | None = None,
    show_progress: bool = True,
) -> Plan:
    """Stage the snapshot this pod should restore and return the plan. Never raises."""
    try:
        return _fetch(
            store=store,
            cache_dir=cache_dir,
            name=name,
            workload=workload,
            trust_dir=trust_dir,
            facts=facts,
            allow_unsigned=allow_unsigned,
            budget=budget,
            show_progress=show_progress,
        )
    except Exception as exc:  # the init container must never fail the pod
        log.debug("fetch failed", exc_info=True)
        return cold_plan(f"internal error: {type(exc).__name__}: {exc}")


def _fetch(
    *,
    store: Store,
    cache_dir: Path,
    name: str,
    workload: str,
    trust_dir: Path | None,
    facts: NodeFacts,
    allow_unsigned: bool,
    budget: int | None,
    show_progress: bool,
) -> Plan:
    if not is_dns1123_label(name):
        return cold_plan(f"invalid name: snapshot name {name!r} is not a DNS-1123 label")
    problems: list[str] = []
    try:
        manifests = store.list_snapshots(name, problems)
    except StoreError as exc:
        return cold_plan(f"store unreadable: {exc}")
    for p in problems:
        log.warning("skipped store entry: %s", p)
    candidates, why = choose(manifests, name, workload, facts)
    if why is not None:
        if problems and not manifests:
            why += f" ({len(problems)} unreadable store entries, first: {problems[0]})"
        return cold_plan(why)

    trusted = load_trusted_keys(trust_dir)
    for p in trusted.problems:
        log.warning("trust directory: %s", p)
    failures: list[str] = []
    for m in candidates:
        outcome = _attempt(store, m, cache_dir, trusted, allow_unsigned, budget, show_progress)
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
    trusted: TrustedKeys,
    allow_unsigned: bool,
    budget: int | None,
    show_progress: bool,
) -> Plan | str:
    """Verify and stage one candidate: its plan (restore, or cold when the cache is full, which an
    older candidate would not cure), or why this candidate cannot be used."""
    try:
        note = verify_manifest(m, trusted, allow_unsigned)
    except ManifestError as exc:
        return f"{_CATEGORY[exc.kind]}: {exc}"
    (log.warning if "accepted because" in note else log.info)("%s", note)
    progress = (
        StderrProgress(f"thaw fetch {m['name']} {m['id'][7:19]}", m["total_bytes"]) if show_progress else None
    )
    waiting = functools.partial(log.info, "another fetch of %s is staging it here; waiting", m["id"])
    try:
        path = stage(store, m, cache_dir, progress, budget=budget, on_wait=waiting)
    except CacheFull as exc:
        return cold_plan(str(exc))
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
    return restore_plan(path, m["id"])


def run(args: argparse.Namespace) -> int:
    """``thaw fetch``: write the plan; exit 0 whatever the outcome (cold is an outcome, not a failure)."""
    from thaw.snapshot.nodefacts import node_facts

    # A plan left by an earlier attempt of this init container must not outlive this one.
    with contextlib.suppress(OSError):
        args.plan.unlink(missing_ok=True)
    try:
        facts = node_facts(args.facts)
    except Exception as exc:  # unreadable --facts, broken NVML: cold, never a failed pod
        plan = cold_plan(f"node facts: {exc}")
    else:
        plan = fetch(
            DirectoryStore(args.store),
            args.cache,
            args.name,
            args.workload,
            args.trust,
            facts,
            allow_unsigned=bool(getattr(args, "allow_unsigned", False)),
            budget=getattr(args, "budget", None),
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
