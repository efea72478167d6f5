"""The webhook's configuration file (``thaw webhook --config FILE``, YAML or JSON) and its defaults.

Loaded and checked once at start-up; a wrong key or value stops the server with a message naming the
key, the value and what is allowed. Everything the mutation needs that depends only on the
configuration is computed here, once (``webhook.patches.Prepared``), so the hot path only fills in
what depends on the pod.

Every key is optional::

    image: ghcr.io/kube-thaw/thaw:0.1.0   # the Thaw image: the runtime at /opt/thaw (bin/thaw, bin/criu)
    imagePullPolicy: IfNotPresent
    excludedNamespaces: [kube-system, thaw-system]
    tools:
      command: [cp, -R, /opt/thaw/., /thaw/]   # how thaw-tools copies the runtime into /thaw
    cache:
      hostPath: /var/lib/thaw/cache      # node cache (hostPath, DirectoryOrCreate)
    store:                               # exactly one of:
      hostPath: /var/lib/thaw/store      #   a node directory (one-node clusters, tests)
      # claimName: thaw-store            #   a PersistentVolumeClaim (ReadWriteMany) in the pod's namespace
    trust:                               # public keys that sign snapshots; exactly one of:
      secretName: thaw-trust
      # configMapName: thaw-trust
    signingKey:                          # mounted only for thaw.dev/checkpoint: on-ready
      secretName: thaw-signing-key
      file: signing.key
    ready:
      default: null                      # THAW_READY when the container has no readinessProbe
    env:
      allowlist: ["VLLM_*", ...]         # env names (PREFIX* for prefixes) in the workload hash
    capabilities: [CHECKPOINT_RESTORE, SYS_PTRACE]
    scheduler:
      extendedResource: false            # request thaw.dev/restore: 1 so the extender is called
      name: null                         # set spec.schedulerName (null: leave it)
    initResources:
      requests: {cpu: 100m, memory: 128Mi}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from thaw.contract.annotations import is_dns1123_label

# How the CLI hands --config to the gunicorn workers (the same name as --config's env fallback).
CONFIG_ENV = "THAW_CONFIG"


class ConfigError(ValueError):
    """The configuration file is wrong; the message names the key, the value and what is allowed."""


DEFAULT_IMAGE = "ghcr.io/kube-thaw/thaw:0.1.0"
DEFAULT_ENV_ALLOWLIST = (
    "VLLM_*",
    "CUDA_*",
    "NCCL_*",
    "TORCH_*",
    "PYTORCH_*",
    "HF_HUB_OFFLINE",
    "MODEL*",
    "OMP_NUM_THREADS",
)
# Why these two (CRIU's criu(8), section NON-ROOT, and the kernel commit that added the capability):
# - CHECKPOINT_RESTORE (Linux >= 5.9): choose the PIDs of restored processes (clone3 set_tid,
#   ns_last_pid) and read /proc/PID/map_files; without it CRIU needs SYS_ADMIN for the same.
# - SYS_PTRACE: seize and interrupt the process tree to dump it (unless yama ptrace_scope is 0).
# SYS_ADMIN is not added by default: it is far broader, and is only needed for a process under a
# seccomp filter (PTRACE_O_SUSPEND_SECCOMP); add it here if your pods run with a seccomp profile.
DEFAULT_CAPABILITIES = ("CHECKPOINT_RESTORE", "SYS_PTRACE")
_CAPABILITY = re.compile(r"^[A-Z][A-Z_]*$")
_READY = re.compile(r"^(https?://\S+|tcp:\d{1,5}|file:/\S*)$")

_KNOWN_KEYS = {
    "image",
    "imagePullPolicy",
    "excludedNamespaces",
    "tools",
    "cache",
    "store",
    "trust",
    "signingKey",
    "ready",
    "env",
    "capabilities",
    "scheduler",
    "initResources",
}


@dataclass(frozen=True, slots=True)
class StoreSource:
    host_path: str | None = None
    claim_name: str | None = None


@dataclass(frozen=True, slots=True)
class TrustSource:
    secret_name: str | None = None
    config_map_name: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    excluded_namespaces: frozenset[str] = frozenset({"kube-system", "thaw-system"})
    # -R, not -a: the Thaw image runs as 65532 and the emptyDir at /thaw is root's, so preserving
    # times or owners fails (GNU cp: "preserving times for '/thaw/.': Operation not permitted",
    # the init container exits 1); -R keeps symlinks and modes, which is all the runtime needs.
    tools_command: tuple[str, ...] = ("cp", "-R", "/opt/thaw/.", "/thaw/")
    cache_host_path: str = "/var/lib/thaw/cache"
    store: StoreSource = StoreSource(host_path="/var/lib/thaw/store")
    trust: TrustSource = TrustSource(secret_name="thaw-trust")
    signing_key_secret: str | None = "thaw-signing-key"
    signing_key_file: str = "signing.key"
    ready_default: str | None = None
    env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    extended_resource: bool = False
    scheduler_name: str | None = None
    init_resources: dict[str, Any] = field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "128Mi"}}
    )


def _expect(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"config {key}={value!r} is not valid: {allowed}")


def _section(raw: Mapping[str, Any], key: str, allowed_keys: set[str]) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    _expect(isinstance(value, Mapping), key, value, "it must be a mapping")
    extra = set(value) - allowed_keys
    _expect(
        not extra, f"{key}.{sorted(extra)[0] if extra else ''}", None, f"known keys: {sorted(allowed_keys)}"
    )
    return dict(value)


def _str(section: Mapping[str, Any], prefix: str, key: str, default: str | None) -> str | None:
    value = section.get(key, default)
    _expect(
        value is None or (isinstance(value, str) and value != ""),
        f"{prefix}{key}",
        value,
        "a non-empty string",
    )
    return None if value is None else str(value)


def _abs_path(section: Mapping[str, Any], prefix: str, key: str, default: str | None) -> str | None:
    value = _str(section, prefix, key, default)
    _expect(value is None or value.startswith("/"), f"{prefix}{key}", value, "an absolute path")
    return value


def _name(section: Mapping[str, Any], prefix: str, key: str, default: str | None) -> str | None:
    value = _str(section, prefix, key, default)
    _expect(
        value is None or is_dns1123_label(value) or _is_subdomain(value),
        f"{prefix}{key}",
        value,
        "a Kubernetes object name (DNS-1123 subdomain)",
    )
    return value


def _is_subdomain(value: str) -> bool:
    return len(value) <= 253 and all(is_dns1123_label(part) for part in value.split("."))


def _str_list(raw: Mapping[str, Any], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return default
    _expect(
        isinstance(value, list) and all(isinstance(v, str) and v for v in value),
        key,
        value,
        "a list of non-empty strings",
    )
    return tuple(value)


def parse_config(raw: Any) -> WebhookConfig:
    """A checked :class:`WebhookConfig` from the parsed file (None or {} gives every default)."""
    if raw is None:
        return WebhookConfig()
    _expect(isinstance(raw, Mapping), "(top level)", type(raw).__name__, "the file must hold a mapping")
    unknown = set(raw) - _KNOWN_KEYS
    _expect(not unknown, sorted(unknown)[0] if unknown else "", None, f"known keys: {sorted(_KNOWN_KEYS)}")
    d = WebhookConfig()

    image = _str(raw, "", "image", d.image)
    policy = raw.get("imagePullPolicy", d.image_pull_policy)
    _expect(
        policy in ("Always", "IfNotPresent", "Never"),
        "imagePullPolicy",
        policy,
        "Always, IfNotPresent, Never",
    )
    excluded = _str_list(raw, "excludedNamespaces", tuple(sorted(d.excluded_namespaces)))

    tools = _section(raw, "tools", {"command"})
    tools_command = d.tools_command
    if "command" in tools:
        tools_command = _str_list({"tools.command": tools["command"]}, "tools.command", d.tools_command)

    cache = _section(raw, "cache", {"hostPath"})
    cache_path = _abs_path(cache, "cache.", "hostPath", d.cache_host_path)

    store_raw = _section(raw, "store", {"hostPath", "claimName"})
    if not store_raw:
        store = d.store
    else:
        _expect(len(store_raw) == 1, "store", store_raw, "exactly one of hostPath, claimName")
        store = StoreSource(
            host_path=_abs_path(store_raw, "store.", "hostPath", None),
            claim_name=_name(store_raw, "store.", "claimName", None),
        )

    trust_raw = _section(raw, "trust", {"secretName", "configMapName"})
    if not trust_raw:
        trust = d.trust
    else:
        _expect(len(trust_raw) == 1, "trust", trust_raw, "exactly one of secretName, configMapName")
        trust = TrustSource(
            secret_name=_name(trust_raw, "trust.", "secretName", None),
            config_map_name=_name(trust_raw, "trust.", "configMapName", None),
        )

    key_raw = _section(raw, "signingKey", {"secretName", "file"})
    signing_secret = (
        _name(key_raw, "signingKey.", "secretName", None) if "secretName" in key_raw else d.signing_key_secret
    )
    if "signingKey" in raw and raw["signingKey"] is None:
        signing_secret = None  # `signingKey: null`: no pod publishes snapshots
    signing_file = _str(key_raw, "signingKey.", "file", d.signing_key_file)
    _expect("/" not in str(signing_file), "signingKey.file", signing_file, "a file name inside the Secret")

    ready = _section(raw, "ready", {"default"})
    ready_default = _str(ready, "ready.", "default", None)
    _expect(
        ready_default is None or bool(_READY.match(ready_default)),
        "ready.default",
        ready_default,
        "http(s)://HOST:PORT/PATH, tcp:PORT or file:PATH",
    )

    env = _section(raw, "env", {"allowlist"})
    allowlist = d.env_allowlist
    if "allowlist" in env:
        allowlist = _str_list({"env.allowlist": env["allowlist"]}, "env.allowlist", d.env_allowlist)

    caps = _str_list(raw, "capabilities", d.capabilities)
    for cap in caps:
        _expect(
            bool(_CAPABILITY.match(cap)) and not cap.startswith("CAP_"),
            "capabilities",
            cap,
            "capability names as Kubernetes writes them, without CAP_ (e.g. CHECKPOINT_RESTORE)",
        )

    sched = _section(raw, "scheduler", {"extendedResource", "name"})
    ext = sched.get("extendedResource", d.extended_resource)
    _expect(isinstance(ext, bool), "scheduler.extendedResource", ext, "true or false")
    scheduler_name = _name(sched, "scheduler.", "name", None)

    init_resources = raw.get("initResources", d.init_resources)
    _expect(
        isinstance(init_resources, Mapping)
        and set(init_resources) <= {"requests", "limits"}
        and all(
            isinstance(v, Mapping) and all(isinstance(q, str | int) for q in v.values())
            for v in init_resources.values()
        ),
        "initResources",
        init_resources,
        "a mapping with requests and/or limits of resource quantities",
    )

    return WebhookConfig(
        image=str(image),
        image_pull_policy=str(policy),
        excluded_namespaces=frozenset(excluded),
        tools_command=tools_command,
        cache_host_path=str(cache_path),
        store=store,
        trust=trust,
        signing_key_secret=signing_secret,
        signing_key_file=str(signing_file),
        ready_default=ready_default,
        env_allowlist=allowlist,
        capabilities=caps,
        extended_resource=ext,
        scheduler_name=scheduler_name,
        init_resources={k: {str(r): str(q) for r, q in v.items()} for k, v in init_resources.items()},
    )


def load_config(path: Path | None) -> WebhookConfig:
    """Read ``path`` (YAML or JSON; None: the defaults)."""
    if path is None:
        return WebhookConfig()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from exc
    try:
        raw = orjson.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}"
        ) from exc
    return parse_config(raw)
