"""The configuration a new replica could differ in (issue 11.9, the runtime's side): recorded at
checkpoint in the snapshot's ``thaw-exec.json`` (``"config"``), computed again at restore; a restore
whose configuration differs cold-starts, naming the variables and files that differ, never their
values. The workload hash pins what the pod spec says (image, command, env references); this pins
what those references held when the snapshot's memory was made (a rotated Secret, an edited
ConfigMap, a variable set from either).

What counts:

- **the environment** of ``thaw exec`` (the container's, which the workload inherits), less
  ``THAW_*`` (Thaw's own, per pod), ``HOSTNAME``, the Kubernetes service links (for each ``X`` with
  an ``X_SERVICE_HOST``: ``X_SERVICE_HOST``, ``X_SERVICE_PORT``, ``X_SERVICE_PORT_<NAME>``, ``X_PORT``,
  ``X_PORT_<N>_<PROTO>`` and its ``_PROTO``, ``_PORT``, ``_ADDR``; services come and go), and the
  per-replica variables the webhook names in ``THAW_REPLICA_ENV``;
- **the files** of the mounts the webhook names in ``THAW_CONFIG_MOUNTS`` (its Secret, ConfigMap and
  projected volumes): every regular file reached from the mount path through visible names (the
  kubelet's ``..data`` and ``..<timestamp>`` entries are reached through the visible symlinks, which
  are followed only where they resolve inside the mount), by its path through those names. At most
  ``MAX_FILES`` files and ``MAX_BYTES`` bytes in all: beyond that a checkpoint is refused (a restore
  could not check them).

The formats the webhook sets (comma-separated, no spaces, empty entries ignored):
``THAW_REPLICA_ENV=POD_NAME,POD_IP`` (variable names) and
``THAW_CONFIG_MOUNTS=/etc/app,/var/run/secrets/app`` (absolute mount paths in the container; a
``subPath`` mount of one file is its file's path).

Each variable and file is recorded as a sha256 (variables of ``NAME=VALUE``), with one digest of the
whole. The snapshot holds the process's memory, environment included, so the digests tell nothing
the snapshot does not; the restore's reason names only variables and paths.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any

from thaw.contract.canonical import canonical_json

FORMAT = 1
REPLICA_ENV = "THAW_REPLICA_ENV"
CONFIG_MOUNTS = "THAW_CONFIG_MOUNTS"
ALWAYS_PER_REPLICA = frozenset({"HOSTNAME"})
MAX_FILES = 1024
MAX_BYTES = 16 << 20
MAX_DEPTH = 16
NAMED = 8  # names listed in a reason before "and N more"
MISSING = "missing"


class ConfigError(RuntimeError):
    """The configuration cannot be recorded or checked (over the caps, unreadable)."""


def names_list(value: str | None) -> list[str]:
    """A comma-separated list as the webhook writes it (pure)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def service_link_names(env: Mapping[str, str]) -> set[str]:
    """The variables the kubelet adds for services (``enableServiceLinks``), pure."""
    out: set[str] = set()
    for key in env:
        if not key.endswith("_SERVICE_HOST"):
            continue
        prefix = re.escape(key[: -len("_SERVICE_HOST")])
        link = re.compile(
            rf"^{prefix}_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT|PORT_[0-9]+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$"
        )
        out |= {k for k in env if link.match(k)}
    return out


def relevant_env(env: Mapping[str, str], per_replica: Iterable[str]) -> dict[str, str]:
    """The variables a new replica of the same workload must have alike (module doc), pure."""
    drop = set(per_replica) | ALWAYS_PER_REPLICA | service_link_names(env)
    return {k: v for k, v in env.items() if not k.startswith("THAW_") and k not in drop}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class _Budget:
    def __init__(self) -> None:
        self.files = 0
        self.bytes = 0

    def take(self, nbytes: int, where: str) -> None:
        self.files += 1
        self.bytes += nbytes
        if self.files > MAX_FILES or self.bytes > MAX_BYTES:
            raise ConfigError(
                f"the configuration mounts ({CONFIG_MOUNTS}) hold more than {MAX_FILES} files or"
                f" {MAX_BYTES >> 20} MiB (at {where}): a restore could not check them"
            )


def _file_digest(real: str, shown: str, budget: _Budget) -> str:
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{shown} is not a regular file")
        budget.take(st.st_size, shown)
        data = f.read(MAX_BYTES + 1)
    if len(data) != st.st_size:
        raise ConfigError(f"{shown} changed while it was read")
    return _sha(data)


def mount_files(mount: str, budget: _Budget | None = None) -> dict[str, str]:
    """sha256 of every file of a configuration mount, by its path through visible names (module doc)."""
    budget = budget or _Budget()
    if not os.path.lexists(mount):
        return {mount: MISSING}
    root = os.path.realpath(mount)
    if os.path.isfile(root):
        return {mount: _file_digest(root, mount, budget)}
    out: dict[str, str] = {}
    seen: set[tuple[int, int]] = set()

    def walk(shown_dir: str, real_dir: str, depth: int) -> None:
        st = os.stat(real_dir)
        if (st.st_dev, st.st_ino) in seen or depth > MAX_DEPTH:
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            names = sorted(os.listdir(real_dir))
        except OSError as exc:
            raise ConfigError(f"cannot list {shown_dir}: {exc.strerror}") from exc
        for name in names:
            if name.startswith(
                ".."
            ):  # the kubelet's ..data and ..<timestamp>: reached through the visible names
                continue
            shown = os.path.join(shown_dir, name)
            real = os.path.realpath(os.path.join(real_dir, name))
            if not _inside(real, root):
                continue  # a symlink out of the mount: not this volume's content
            try:
                mode = os.stat(real).st_mode
            except OSError:
                continue  # a dangling link
            if stat.S_ISDIR(mode):
                walk(shown, real, depth + 1)
            elif stat.S_ISREG(mode):
                out[shown] = _file_digest(real, shown, budget)

    walk(mount.rstrip("/") or "/", root, 0)
    return out


def record(env: Mapping[str, str], mounts: Iterable[str] | None = None) -> dict[str, Any]:
    """The configuration of this replica (module doc). ``mounts`` default: ``THAW_CONFIG_MOUNTS``.
    Raises ConfigError over the caps or when a file cannot be read."""
    per_replica = names_list(env.get(REPLICA_ENV))
    listed = sorted(set(names_list(env.get(CONFIG_MOUNTS)) if mounts is None else mounts))
    for m in listed:
        if not m.startswith("/"):
            raise ConfigError(f"{CONFIG_MOUNTS} lists {m!r}: mount paths are absolute")
    budget = _Budget()
    files: dict[str, str] = {}
    for m in listed:
        files.update(mount_files(m, budget))
    env_digests = {k: _sha(f"{k}={v}".encode()) for k, v in sorted(relevant_env(env, per_replica).items())}
    body = {"env": env_digests, "files": files}
    return {
        "format": FORMAT,
        "digest": _sha(canonical_json(body)),
        **body,
        "mounts": listed,
        "replica_env": sorted(per_replica),
    }


def _named(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:NAMED])
    more = f" and {len(items) - NAMED} more" if len(items) > NAMED else ""
    return f"{kind} {shown}{more}"


def compare(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """What differs between two name -> digest maps, by name only (pure)."""
    out = []
    for name in sorted(set(old) | set(new)):
        if name not in new:
            out.append(f"{name} (not here)")
        elif name not in old:
            out.append(f"{name} (only here)")
        elif old[name] != new[name]:
            out.append(f"{name} ({'missing here' if new[name] == MISSING else 'changed'})")
    return out


def differences(recorded: Any, env: Mapping[str, str]) -> str | None:
    """Why this replica's configuration is not the snapshot's, naming what differs (never values), or
    None when it is the same or the snapshot recorded none."""
    if recorded is None:
        return None
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        return f"the snapshot's configuration record has an unknown format (want {FORMAT})"
    per_replica = set(names_list(env.get(REPLICA_ENV))) | set(recorded.get("replica_env") or [])
    mounts = set(recorded.get("mounts") or []) | set(names_list(env.get(CONFIG_MOUNTS)))
    try:
        here = record({**env, REPLICA_ENV: ",".join(sorted(per_replica))}, sorted(mounts))
    except ConfigError as exc:
        return f"the configuration cannot be checked: {exc}"
    old_env = {k: v for k, v in (recorded.get("env") or {}).items() if k not in per_replica}
    parts = []
    if env_diff := compare(old_env, here["env"]):
        parts.append(_named("environment", env_diff))
    if file_diff := compare(recorded.get("files") or {}, here["files"]):
        parts.append(_named("files", file_diff))
    return "this replica's configuration differs from the snapshot's: " + "; ".join(parts) if parts else None
