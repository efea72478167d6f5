"""The workload hash (``thaw.dev/workload``): what makes two containers interchangeable for a snapshot.

A snapshot holds a process's whole memory, so it may only stand in for a container that would have
computed the same state: same image, same command line, same environment that shapes start-up, same
resources, same mounts. The webhook stamps this hash on the pod from the container *as the user wrote
it* (before injection); ``thaw fetch`` and ``thaw publish`` match snapshots on it; the extender
compares it with the ``workload`` in each node's ``thaw.dev/cache``. One function, so the pieces never
disagree.

Contract (version 1): the first 32 hex digits of the sha256 of the canonical JSON
(``thaw.contract.canonical``) of::

    {"v": 1, "image": ..., "command": [...], "args": [...], "env": {NAME: value-or-ref},
     "resources": {...}, "mounts": [{"mountPath", "readOnly", "subPath", "subPathExpr",
     "mountPropagation"}, ... sorted by mountPath]}

- ``env``: only names matched by the allowlist (exact names, or prefixes written ``PREFIX*``).
  A literal value is hashed as its string; a ``valueFrom`` is hashed *by reference* (the
  ``valueFrom`` object: which Secret/ConfigMap key or field), never by the value it resolves to,
  which the webhook cannot see. ``envFrom`` is not hashed (its keys are unknown at admission).
- ``mounts``: by path and options, not by volume name: volume names are pod-local and some carry a
  random suffix (the ServiceAccount admission plugin's ``kube-api-access-xxxxx``). Thaw's own mounts
  (paths under ``EXCLUDED_MOUNT_PATHS``) are left out, so the hash of an injected container equals
  the hash of the original.
- ``resources``: as the API server serialises them (quantities already canonical), without Thaw's
  extended resource ``thaw.dev/restore``.
- absent and empty are the same (``command: []`` == no command), so defaulting does not change it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from thaw.contract.annotations import EXTENDED_RESOURCE
from thaw.contract.canonical import digest

WORKLOAD_HASH_VERSION = 1
WORKLOAD_HASH_HEX_DIGITS = 32

# Mount paths the webhook adds to the target container (webhook/patches.py); never part of the hash.
EXCLUDED_MOUNT_PATHS: frozenset[str] = frozenset(
    {"/thaw", "/run/thaw", "/var/lib/thaw/cache", "/var/lib/thaw/store", "/etc/thaw/key"}
)
_MOUNT_FIELDS = ("mountPath", "readOnly", "subPath", "subPathExpr", "mountPropagation")


@dataclass(frozen=True, slots=True)
class EnvAllowlist:
    """Which environment variables shape a workload: exact names and name prefixes."""

    names: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> EnvAllowlist:
        names: set[str] = set()
        prefixes: list[str] = []
        for p in patterns:
            if p.endswith("*"):
                prefixes.append(p[:-1])
            else:
                names.add(p)
        return cls(frozenset(names), tuple(prefixes))

    def allows(self, name: str) -> bool:
        return name in self.names or name.startswith(self.prefixes)


def workload_doc(container: Mapping[str, Any], allowlist: EnvAllowlist) -> dict[str, Any]:
    """The document that is hashed (exposed for debugging: ``thaw`` can show why two differ)."""
    env: dict[str, Any] = {}
    for item in container.get("env") or ():
        if not isinstance(item, Mapping):
            continue
        name = item.get("name")
        if not isinstance(name, str) or not allowlist.allows(name):
            continue
        if item.get("valueFrom") is not None:
            env[name] = {"valueFrom": item["valueFrom"]}
        else:
            env[name] = item.get("value") or ""
    mounts = []
    for m in container.get("volumeMounts") or ():
        if not isinstance(m, Mapping):
            continue
        path = m.get("mountPath")
        if not isinstance(path, str) or path in EXCLUDED_MOUNT_PATHS:
            continue
        mounts.append({k: m[k] for k in _MOUNT_FIELDS if m.get(k) not in (None, "", False)})
    mounts.sort(key=lambda m: str(m["mountPath"]))
    return {
        "v": WORKLOAD_HASH_VERSION,
        "image": container.get("image") or "",
        "command": list(container.get("command") or ()),
        "args": list(container.get("args") or ()),
        "env": env,
        "resources": _resources(container.get("resources")),
        "mounts": mounts,
    }


def _resources(resources: Any) -> Any:
    # The extended resource the webhook may add only steers scheduling; it never changes the process.
    if not isinstance(resources, Mapping):
        return resources or {}
    out: dict[str, Any] = {}
    for key, value in resources.items():
        kept = value
        if isinstance(value, Mapping) and EXTENDED_RESOURCE in value:
            kept = {k: v for k, v in value.items() if k != EXTENDED_RESOURCE}
        if kept:
            out[key] = kept
    return out


def workload_hash(container: Mapping[str, Any], allowlist: EnvAllowlist) -> str:
    """``thaw.dev/workload`` for ``container`` (a Kubernetes Container object as JSON)."""
    return digest(workload_doc(container, allowlist))[:WORKLOAD_HASH_HEX_DIGITS]
