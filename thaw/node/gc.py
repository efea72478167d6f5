"""``thaw gc``: retention for every store (a directory or a registry).

Keeps, per (namespace, name, workload), the newest ``--keep`` snapshots (by ``min(created,
stored_at)``, the order fetch uses), and every snapshot that a node advertises in its
``thaw.dev/cache`` annotation (read from the cluster: a node that holds a snapshot may be restoring
it, and the extender sends pods there for it). Everything else of the names looked at is deleted
(``--dry-run``: only listed). Fails safe: a cluster that cannot be read, or a node whose annotation
cannot be parsed, deletes nothing; an entry the store cannot read is reported and left alone.

A registry deletes the snapshot's manifest (its tag goes with it); the blobs are reclaimed by the
registry's own garbage collection (distribution: ``registry garbage-collect``), which keeps any blob
another snapshot still names.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

from thaw.contract.annotations import NODE_CACHE
from thaw.contract.inventory import InventoryError, parse_inventory
from thaw.contract.manifest import Manifest, parse_created
from thaw.errors import ThawError, UsageError
from thaw.snapshot.store import Listing

log = logging.getLogger("thaw.gc")

MAX_PER_NAME = 10_000  # snapshots read per (namespace, name): retention keeps far fewer
NODE_PAGE = 500


class GcError(ThawError):
    """Retention cannot run safely (the cluster or the store cannot be read); nothing was deleted."""


@dataclass(frozen=True)
class Entry:
    namespace: str
    name: str
    manifest: Manifest
    stored_at: float | None

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def when(self) -> float:
        """The time fetch orders by: the earlier of the signer's and the store's."""
        created = parse_created(self.manifest["created"])
        return created if self.stored_at is None else min(created, self.stored_at)


Action = Literal["keep", "delete"]


@dataclass(frozen=True)
class Decision:
    entry: Entry
    action: Action
    why: str


def retention(entries: Iterable[Entry], keep: int, advertised: dict[str, list[str]]) -> list[Decision]:
    """What to keep and delete. Pure. ``advertised``: snapshot id -> nodes advertising it."""
    if keep < 1:
        raise ValueError(
            f"--keep must be at least 1 (the newest snapshot is what new pods restore), got {keep}"
        )
    groups: dict[tuple[str, str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        groups[(e.namespace, e.name, e.manifest["workload"])].append(e)
    out: list[Decision] = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda e: (e.when, e.id), reverse=True)
        for i, e in enumerate(group):
            if i < keep:
                out.append(Decision(e, "keep", f"newest {i + 1} of {len(group)} for its workload"))
            elif e.id in advertised:
                nodes = advertised[e.id]
                shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
                out.append(Decision(e, "keep", f"advertised by node(s) {shown}"))
            else:
                out.append(Decision(e, "delete", f"older than the newest {keep} for its workload"))
    return out


def advertised_ids(nodes: Iterable[tuple[str, dict[str, str] | None]]) -> dict[str, list[str]]:
    """snapshot id -> names of the nodes whose ``thaw.dev/cache`` lists it. Pure. GcError for an
    annotation that cannot be parsed: what that node holds is unknown, so nothing may go."""
    out: dict[str, list[str]] = defaultdict(list)
    for name, annots in nodes:
        raw = (annots or {}).get(NODE_CACHE)
        if raw is None:
            continue
        try:
            inv = parse_inventory(raw)
        except InventoryError as exc:
            raise GcError(
                f"node {name}: invalid {NODE_CACHE} ({exc}): what it holds is unknown; nothing deleted"
            ) from None
        for s in inv["snapshots"]:
            out[s["id"]].append(name)
    return dict(out)


def cluster_nodes(api: Any) -> list[tuple[str, dict[str, str] | None]]:
    """(name, annotations) of every Node, paginated."""
    out: list[tuple[str, dict[str, str] | None]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": NODE_PAGE}
        if token:
            kwargs["_continue"] = token
        page = api.list_node(**kwargs)
        out.extend((item.metadata.name, item.metadata.annotations) for item in page.items)
        token = page.metadata._continue if page.metadata else None
        if not token:
            return out


class RetainedStore(Protocol):
    """What retention needs of a store (DirectoryStore and RegistryStore implement it)."""

    def describe(self) -> str: ...

    def names(self) -> list[tuple[str, str]]: ...

    def list_snapshots(
        self, namespace: str, name: str, problems: list[str] | None = None, *, limit: int = ...
    ) -> Sequence[Listing]: ...

    def delete(self, namespace: str, name: str, snapshot_id: str) -> None: ...


def collect(store: RetainedStore, names: list[tuple[str, str]], problems: list[str]) -> list[Entry]:
    """Every snapshot of each (namespace, name), with the store's time."""
    entries: list[Entry] = []
    for namespace, name in names:
        listed = store.list_snapshots(namespace, name, problems, limit=MAX_PER_NAME)
        entries.extend(Entry(namespace, name, item.manifest, item.stored_at) for item in listed)
    return entries


def _line(d: Decision, dry_run: bool) -> str:
    e = d.entry
    verb = ("would delete" if dry_run else "delete") if d.action == "delete" else "keep"
    return (
        f"{verb:12}  {e.namespace}/{e.name}  {e.id[:19]}…  workload {e.manifest['workload'][:16]}  "
        f"created {e.manifest['created'][:19]}  {e.manifest['total_bytes']} bytes  ({d.why})"
    )


def run_gc(
    store: RetainedStore, api: Any, names: list[tuple[str, str]] | None, keep: int, dry_run: bool
) -> int:
    """Decide and (unless ``dry_run``) delete; print one line per snapshot. Returns the exit code."""
    try:
        nodes = cluster_nodes(api)
    except Exception as exc:
        reason = getattr(exc, "reason", None) or exc
        raise GcError(
            f"cannot list Nodes ({reason}): which snapshots nodes hold is unknown; nothing deleted"
        ) from None
    advertised = advertised_ids(nodes)
    if names is None:
        names = store.names()
    problems: list[str] = []
    decisions = retention(collect(store, names, problems), keep, advertised)
    for p in problems:
        sys.stderr.write(f"thaw gc: left alone (unreadable): {p}\n")
    failed = 0
    for d in decisions:
        sys.stdout.write(_line(d, dry_run) + "\n")
        if d.action == "delete" and not dry_run:
            try:
                store.delete(d.entry.namespace, d.entry.name, d.entry.id)
            except Exception as exc:
                failed += 1
                sys.stderr.write(
                    f"thaw gc: could not delete {d.entry.namespace}/{d.entry.name} {d.entry.id}: {exc}\n"
                )
    deleted = sum(1 for d in decisions if d.action == "delete")
    sys.stderr.write(
        f"thaw gc: {store.describe()}: {len(decisions)} snapshot(s) in {len(names)} name(s); "
        f"{'would delete' if dry_run else 'deleted'} {deleted - failed}, kept {len(decisions) - deleted}"
        f"{f', {failed} delete(s) failed' if failed else ''}\n"
    )
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """``thaw gc --store S --keep N [--namespace NS [--name NAME]] [--dry-run]``."""
    from thaw.node.agent import core_api
    from thaw.snapshot.stores import store_from_args

    if args.name and not args.namespace:
        raise UsageError("--name needs --namespace (snapshot names are per namespace)")
    try:
        opened = store_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not all(hasattr(opened, m) for m in ("names", "delete")):
        raise UsageError(f"store {opened.describe()} does not support retention (no names/delete)")
    store = cast(RetainedStore, opened)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    names: list[tuple[str, str]] | None = None
    if args.namespace:
        names = (
            [(args.namespace, args.name)]
            if args.name
            else [(ns, n) for ns, n in store.names() if ns == args.namespace]
        )
    return run_gc(store, core_api(), names, args.keep, args.dry_run)
