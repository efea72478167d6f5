"""The workload hash (``thaw.dev/workload``): what makes two containers interchangeable for a snapshot.

A snapshot holds a process's whole memory, so it may only stand in for a container that would have
computed the same state: same namespace, same image, same command line, same environment that
shapes start-up, same resources, same mounts. The webhook stamps this hash on the pod from the
container *as the user wrote it* (before injection) and the namespace of the admission request;
``thaw fetch`` and ``thaw publish`` match snapshots on it; the extender compares it with the
``workload`` in each node's ``thaw.dev/cache``. One function, so the pieces never disagree.

Contract (version 2): the first 32 hex digits of the sha256 of the canonical JSON
(``thaw.contract.canonical``) of::

    {"v": 2, "namespace": ..., "image": ..., "command": [...], "args": [...],
     "env": {NAME: value-or-ref}, "envFrom": [...], "resources": {...},
     "mounts": [{"mountPath", "readOnly", "subPath", "subPathExpr", "mountPropagation"}, ...
     sorted by mountPath]}

- ``namespace``: containers in two namespaces are never interchangeable (a snapshot holds the
  memory of its namespace's Secrets); new in version 2.
- ``image``: by digest where the reference has one (``repo:tag@sha256:...`` is hashed as
  ``repo@sha256:...``: the digest decides, the tag is a label); otherwise the reference as written.
  A tag without a digest can be re-pushed, and a replica would then restore the old image's memory
  over the new image's files, so the webhook warns about it (``is_pinned``).
- ``env``: only names matched by the allowlist (exact names, or prefixes written ``PREFIX*``).
  A literal value is hashed as its string; a ``valueFrom`` is hashed *by reference* (the
  ``valueFrom`` object: which Secret/ConfigMap key or field), never by the value it resolves to,
  which the webhook cannot see. The values of Secrets and ConfigMaps are checked at run time
  instead: the runtime digests the environment and the files of the mounts named below
  (``THAW_REPLICA_ENV``, ``THAW_CONFIG_MOUNTS``) into the snapshot.
- ``envFrom``: the references as written (which ConfigMaps/Secrets, with which prefixes, in order);
  new in version 2 (their keys are unknown at admission).
- ``mounts``: by path and options, not by volume name: volume names are pod-local and some carry a
  random suffix (the ServiceAccount admission plugin's ``kube-api-access-xxxxx``). Thaw's own mounts
  (``EXCLUDED_MOUNT_PATHS``, and anything under ``CACHE_MOUNT_ROOT``) are left out, so the hash of an
  injected container equals the hash of the original.
- ``resources``: as the API server serialises them (quantities already canonical), without Thaw's
  extended resource ``thaw.dev/restore``.
- absent and empty are the same (``command: []`` == no command), so defaulting does not change it.

Also here, because they read the same container: the two lists the webhook hands ``thaw exec``
(``replica_env``, ``config_mounts``; one comma-separated value each, ``render_names``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from thaw.contract.annotations import EXTENDED_RESOURCE
from thaw.contract.canonical import digest

WORKLOAD_HASH_VERSION = 2
WORKLOAD_HASH_HEX_DIGITS = 32

# Mount paths the webhook adds to the target container (webhook/patches.py); never part of the hash.
# The workload's own snapshots are mounted at CACHE_MOUNT_ROOT/<namespace>/<name>.
CACHE_MOUNT_ROOT = "/var/lib/thaw/cache"
EXCLUDED_MOUNT_PATHS: frozenset[str] = frozenset(
    {"/thaw", "/run/thaw/plan", "/run/thaw/work", "/var/lib/thaw/runtime", CACHE_MOUNT_ROOT}
)
_MOUNT_FIELDS = ("mountPath", "readOnly", "subPath", "subPathExpr", "mountPropagation")

# Env the webhook sets on every Thaw workload unless its container sets the name itself; one list,
# each entry with its reason (like thaw.contract.nccl.NCCL_ENV for tensor-parallel pods), for the
# webhook and for anything that runs a workload as the webhook would (the GPU benchmark):
# - TORCHINDUCTOR_COMPILE_THREADS=1: torch inductor's compile workers (a process pool, one per core
#   by default) keep /dev/nvidia* open without CUDA state of their own; CRIU's CUDA plugin cannot
#   dump them ("handle_device_vma plugin failed ... Can't handle non-regular mapping"), so the pod
#   would never checkpoint. With 1, inductor compiles in the server's own process. vLLM sets it
#   itself; SGLang, TGI, plain transformers and custom servers do not.
DEFAULT_ENV: tuple[tuple[str, str], ...] = (("TORCHINDUCTOR_COMPILE_THREADS", "1"),)

# The env names the webhook hands thaw exec, and how a list of names is written in one value.
REPLICA_ENV = "THAW_REPLICA_ENV"
CONFIG_MOUNTS = "THAW_CONFIG_MOUNTS"
NAMES_SEPARATOR = ","


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


def _is_thaw_mount(path: str) -> bool:
    return path in EXCLUDED_MOUNT_PATHS or path.startswith(CACHE_MOUNT_ROOT + "/")


def image_identity(image: str) -> str:
    """What of an image reference is hashed: ``repo@digest`` where there is a digest, else as written."""
    name, at, digest_part = image.partition("@")
    if not at:
        return image
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a tag (a colon before the last slash is a registry port)
        name = name[:colon]
    return f"{name}@{digest_part}"


def is_pinned(image: str) -> bool:
    """The reference names a digest (``@sha256:...``), so a re-push cannot change what it means."""
    return "@" in image and image.partition("@")[2].count(":") == 1


def workload_doc(container: Mapping[str, Any], allowlist: EnvAllowlist, namespace: str) -> dict[str, Any]:
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
        if not isinstance(path, str) or _is_thaw_mount(path):
            continue
        mounts.append({k: m[k] for k in _MOUNT_FIELDS if m.get(k) not in (None, "", False)})
    mounts.sort(key=lambda m: str(m["mountPath"]))
    image = container.get("image")
    return {
        "v": WORKLOAD_HASH_VERSION,
        "namespace": namespace,
        "image": image_identity(image) if isinstance(image, str) else "",
        "command": list(container.get("command") or ()),
        "args": list(container.get("args") or ()),
        "env": env,
        "envFrom": [e for e in container.get("envFrom") or () if isinstance(e, Mapping)],
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


def workload_hash(container: Mapping[str, Any], allowlist: EnvAllowlist, namespace: str) -> str:
    """``thaw.dev/workload`` for ``container`` (a Kubernetes Container object as JSON) in ``namespace``."""
    return digest(workload_doc(container, allowlist, namespace))[:WORKLOAD_HASH_HEX_DIGITS]


# --- what a new replica may differ in ------------------------------------------------------------


def replica_env(container: Mapping[str, Any]) -> list[str]:
    """Env names whose values differ per replica by construction: set from ``fieldRef`` (the pod's
    name, IP, node...) or ``resourceFieldRef``; the runtime leaves them out of the configuration
    digest."""
    names: list[str] = []
    for item in container.get("env") or ():
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            continue
        source = item.get("valueFrom")
        per_replica = isinstance(source, Mapping) and ("fieldRef" in source or "resourceFieldRef" in source)
        if per_replica and item["name"] not in names:
            names.append(item["name"])
    return names


def _is_config_volume(volume: Mapping[str, Any]) -> bool:
    if "secret" in volume or "configMap" in volume:
        return True
    projected = volume.get("projected")
    if not isinstance(projected, Mapping):
        return False
    # The ServiceAccount token volume (kube-api-access-*) is a fresh token per pod, not configuration.
    sources = projected.get("sources") or ()
    return not any(isinstance(s, Mapping) and "serviceAccountToken" in s for s in sources)


def config_mounts(container: Mapping[str, Any], volumes: Sequence[Any] | None) -> list[str]:
    """Mount paths of the container's Secret, ConfigMap and projected volumes (not the ServiceAccount
    token): the files whose content a replica could differ in, digested into the snapshot by the
    runtime."""
    by_name = {
        v["name"]: v for v in volumes or () if isinstance(v, Mapping) and isinstance(v.get("name"), str)
    }
    paths: set[str] = set()
    for m in container.get("volumeMounts") or ():
        if not isinstance(m, Mapping) or not isinstance(m.get("mountPath"), str):
            continue
        volume = by_name.get(m.get("name"))
        if volume is not None and _is_config_volume(volume):
            paths.add(m["mountPath"])
    return sorted(paths)


def render_names(names: Iterable[str]) -> str:
    """One env value for a list of names or paths (neither contains the separator in practice; a
    name that does is left out rather than split in two)."""
    return NAMES_SEPARATOR.join(n for n in names if NAMES_SEPARATOR not in n)
