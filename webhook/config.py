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
      command: [/opt/thaw/bin/thaw, install-runtime]   # thaw-tools: the runtime linked at /thaw/rt
    runtime:
      hostPath: /var/lib/thaw/runtime    # the node's copy of the runtime bundle (one per bundle id)
    cache:
      hostPath: /var/lib/thaw/cache      # node cache (hostPath, DirectoryOrCreate)
    store:                               # exactly one of:
      hostPath: /var/lib/thaw/store      #   a node directory: serves ONE node (one-node clusters, tests)
      # claimName: thaw-store            #   a PersistentVolumeClaim (ReadWriteMany) in the pod's namespace
      # registry: oci://HOST[:PORT]/REPO #   an OCI registry (docs/registry.md), with:
      # authSecretName: thaw-registry    #     a kubernetes.io/dockerconfigjson Secret (pod's namespace)
      # caConfigMap: thaw-registry-ca    #     or caSecret: the registry's CA (key caKey, default ca.crt)
    trust:                               # public keys that sign snapshots; exactly one of:
      secretName: thaw-trust
      # configMapName: thaw-trust
    signingKey:                          # mounted only into thaw-sidecar, for thaw.dev/checkpoint: on-ready
      secretName: thaw-signing-key       # (null: no pod publishes snapshots)
      file: signing.key
    ready:
      default: null                      # THAW_READY when the container has no readinessProbe
      startupProbe: false                # an exec startupProbe on <work>/ready for every pod (pods
                                         #   with sleep/wake hooks always get it)
    env:
      allowlist: ["VLLM_*", ...]         # env names (PREFIX* for prefixes) in the workload hash
    capabilities: [CHECKPOINT_RESTORE, SYS_PTRACE]
    scheduler:
      extendedResource: false            # request thaw.dev/restore: 1 (breaks autoscalers:
                                         #   docs/scheduler-wiring.md)
      name: null                         # set spec.schedulerName (null: leave it)
    initResources:                       # thaw-tools and thaw-fetch
      requests: {cpu: 100m, memory: 128Mi}
    sidecarResources:                    # thaw-sidecar, which runs as long as the pod
      requests: {cpu: 10m, memory: 64Mi}
      limits: {memory: 256Mi}

The file's shape is a tree of ``msgspec`` Structs (``ConfigFile``): types, unknown keys and value
patterns are checked by ``msgspec.convert`` in one pass, and its errors are turned into this
module's messages (``ConfigError``) with the value found and, where a pattern alone would be
cryptic, what is allowed in words (``_ALLOWED``). The result is the flat, frozen ``WebhookConfig``
that the rest of the webhook reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import orjson
import yaml

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
DEFAULT_CA_KEY = "ca.crt"  # store.caKey: the registry CA's key in its Secret or ConfigMap
# thaw-tools runs the image's own runtime: `thaw install-runtime` copies the bundle once per node
# (hostPath `runtime.hostPath`) and links it into the pod's tools emptyDir (/thaw/rt).
DEFAULT_TOOLS_COMMAND = ("/opt/thaw/bin/thaw", "install-runtime")
DEFAULT_INIT_RESOURCES: dict[str, dict[str, str]] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
# thaw-sidecar idles for the pod's life and works once (a publish: copy and hash, streamed); a
# limit on memory only, so a publish may use idle CPU without being throttled.
DEFAULT_SIDECAR_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "10m", "memory": "64Mi"},
    "limits": {"memory": "256Mi"},
}

# --- the file's shape ------------------------------------------------------------------------------

_ABS_PATH = r"^/"
_DNS_SUBDOMAIN = r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
_READY = r"^(https?://\S+|tcp:\d{1,5}|file:/\S*)$"
_CAPABILITY = r"^(?!CAP_)[A-Z][A-Z_]*$"
_FILE_NAME = r"^[^/]+$"
# oci://HOST[:PORT]/REPOSITORY (thaw/snapshot/oci.py parses it fully; this catches the obvious).
_REGISTRY = r"^oci://[A-Za-z0-9.\-\[\]:]+/[a-z0-9]+([._/-]+[a-z0-9]+)*$"
# Kubernetes resource.Quantity (apimachinery quantity.go's grammar, as a regular expression).
_QUANTITY = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
AbsPath = Annotated[str, msgspec.Meta(pattern=_ABS_PATH)]
ObjectName = Annotated[str, msgspec.Meta(pattern=_DNS_SUBDOMAIN)]
Quantity = Annotated[str, msgspec.Meta(pattern=_QUANTITY)] | Annotated[int, msgspec.Meta(ge=0)]
ResourceName = Annotated[str, msgspec.Meta(min_length=1)]


class _Section(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """A mapping in the file: camelCase keys, unknown keys refused."""


class ToolsSection(_Section, frozen=True):
    command: Annotated[list[NonEmpty], msgspec.Meta(min_length=1)] | None = None


class HostPathSection(_Section, frozen=True):
    host_path: AbsPath | None = None


class StoreSection(_Section, frozen=True):
    host_path: AbsPath | None = None
    claim_name: ObjectName | None = None
    registry: Annotated[str, msgspec.Meta(pattern=_REGISTRY)] | None = None
    auth_secret_name: ObjectName | None = None
    ca_config_map: ObjectName | None = None
    ca_secret: ObjectName | None = None
    ca_key: Annotated[str, msgspec.Meta(pattern=_FILE_NAME)] | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.host_path, self.claim_name, self.registry)) != 1:
            raise ValueError("exactly one of hostPath, claimName, registry")
        registry_only = (self.auth_secret_name, self.ca_config_map, self.ca_secret, self.ca_key)
        if self.registry is None and any(x is not None for x in registry_only):
            raise ValueError("only with registry: authSecretName, caConfigMap, caSecret, caKey")
        if self.ca_config_map is not None and self.ca_secret is not None:
            raise ValueError("at most one of caConfigMap, caSecret")
        if self.ca_key is not None and self.ca_config_map is None and self.ca_secret is None:
            raise ValueError("only with caConfigMap or caSecret: caKey")


class TrustSection(_Section, frozen=True):
    secret_name: ObjectName | None = None
    config_map_name: ObjectName | None = None

    def __post_init__(self) -> None:
        if (self.secret_name is None) == (self.config_map_name is None):
            raise ValueError("exactly one of secretName, configMapName")


class SigningKeySection(_Section, frozen=True):
    secret_name: ObjectName | None = None
    file: Annotated[str, msgspec.Meta(pattern=_FILE_NAME)] | None = None


class ReadySection(_Section, frozen=True):
    default: Annotated[str, msgspec.Meta(pattern=_READY)] | None = None
    startup_probe: bool = False


class EnvSection(_Section, frozen=True):
    allowlist: list[NonEmpty] | None = None


class SchedulerSection(_Section, frozen=True):
    extended_resource: bool | None = None
    name: ObjectName | None = None


class ResourcesSection(_Section, frozen=True):
    requests: dict[ResourceName, Quantity] | None = None
    limits: dict[ResourceName, Quantity] | None = None


class ConfigFile(_Section, frozen=True):
    """The whole file, as written (``None``: the key is absent or null)."""

    image: NonEmpty | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    excluded_namespaces: list[NonEmpty] | None = None
    tools: ToolsSection | None = None
    runtime: HostPathSection | None = None
    cache: HostPathSection | None = None
    store: StoreSection | None = None
    trust: TrustSection | None = None
    # UNSET: absent (the default Secret); None: `signingKey: null`, no pod publishes.
    signing_key: SigningKeySection | msgspec.UnsetType | None = msgspec.UNSET
    ready: ReadySection | None = None
    env: EnvSection | None = None
    capabilities: list[Annotated[str, msgspec.Meta(pattern=_CAPABILITY)]] | None = None
    scheduler: SchedulerSection | None = None
    init_resources: ResourcesSection | None = None
    sidecar_resources: ResourcesSection | None = None


# What a pattern means, in words, by key path ("[]" stands for any list index or map key).
_ALLOWED: dict[str, str] = {
    "runtime.hostPath": "an absolute path",
    "cache.hostPath": "an absolute path",
    "store.hostPath": "an absolute path",
    "store.claimName": "a Kubernetes object name (DNS-1123 subdomain)",
    "store.registry": "oci://HOST[:PORT]/REPOSITORY (lower-case repository path)",
    "store.authSecretName": "a Kubernetes object name (DNS-1123 subdomain)",
    "store.caConfigMap": "a Kubernetes object name (DNS-1123 subdomain)",
    "store.caSecret": "a Kubernetes object name (DNS-1123 subdomain)",
    "store.caKey": "a file name inside the Secret or ConfigMap",
    "trust.secretName": "a Kubernetes object name (DNS-1123 subdomain)",
    "trust.configMapName": "a Kubernetes object name (DNS-1123 subdomain)",
    "signingKey.secretName": "a Kubernetes object name (DNS-1123 subdomain)",
    "signingKey.file": "a file name inside the Secret",
    "ready.default": "http(s)://HOST:PORT/PATH, tcp:PORT or file:PATH",
    "scheduler.name": "a scheduler name (DNS-1123 subdomain), e.g. thaw-scheduler",
    "scheduler.extendedResource": "true or false",
    "ready.startupProbe": "true or false",
    "imagePullPolicy": "Always, IfNotPresent, Never",
    "capabilities[]": "capability names as Kubernetes writes them, without CAP_ (e.g. CHECKPOINT_RESTORE)",
    "initResources.requests[]": "a Kubernetes quantity (e.g. 100m, 128Mi)",
    "initResources.limits[]": "a Kubernetes quantity (e.g. 100m, 128Mi)",
    "sidecarResources.requests[]": "a Kubernetes quantity (e.g. 100m, 128Mi)",
    "sidecarResources.limits[]": "a Kubernetes quantity (e.g. 100m, 128Mi)",
    "": "the file must hold a mapping",
    "image": "a non-empty string (an image reference)",
    "excludedNamespaces": "a list of namespace names",
    "excludedNamespaces[]": "a non-empty namespace name",
    "tools.command": "a non-empty list of non-empty strings (the command thaw-tools runs)",
    "tools.command[]": "a non-empty string",
    "env.allowlist": "a list of env names (PREFIX* for a prefix)",
    "env.allowlist[]": "a non-empty env name (PREFIX* for a prefix)",
    "capabilities": "a list of capability names, e.g. [CHECKPOINT_RESTORE, SYS_PTRACE]",
}
for _section in ("tools", "runtime", "cache", "store", "trust", "signingKey", "ready", "env", "scheduler"):
    _ALLOWED.setdefault(_section, "a mapping")
for _section in ("initResources", "sidecarResources"):
    _ALLOWED[_section] = "a mapping with requests and/or limits of resource quantities"
    _ALLOWED[_section + ".requests"] = _ALLOWED[_section + ".limits"] = "a mapping of resource quantities"


# --- what the webhook reads ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreSource:
    """Exactly one of ``host_path``, ``claim_name``, ``registry``; the rest only with ``registry``."""

    host_path: str | None = None
    claim_name: str | None = None
    registry: str | None = None  # oci://HOST[:PORT]/REPOSITORY
    auth_secret_name: str | None = None  # kubernetes.io/dockerconfigjson, in the pod's namespace
    ca_config_map: str | None = None
    ca_secret: str | None = None
    ca_key: str = DEFAULT_CA_KEY


@dataclass(frozen=True, slots=True)
class TrustSource:
    secret_name: str | None = None
    config_map_name: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    excluded_namespaces: frozenset[str] = frozenset({"kube-system", "thaw-system"})
    tools_command: tuple[str, ...] = DEFAULT_TOOLS_COMMAND
    runtime_host_path: str = "/var/lib/thaw/runtime"
    cache_host_path: str = "/var/lib/thaw/cache"
    store: StoreSource = StoreSource(host_path="/var/lib/thaw/store")
    trust: TrustSource = TrustSource(secret_name="thaw-trust")
    signing_key_secret: str | None = "thaw-signing-key"
    signing_key_file: str = "signing.key"
    ready_default: str | None = None
    # Off until the GPU measurement decides (issue 10.4): gate readiness on the runtime's ready file.
    ready_startup_probe: bool = False
    env_allowlist: tuple[str, ...] = DEFAULT_ENV_ALLOWLIST
    capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES
    extended_resource: bool = False
    scheduler_name: str | None = None
    init_resources: dict[str, dict[str, str]] = field(default_factory=lambda: _copy(DEFAULT_INIT_RESOURCES))
    sidecar_resources: dict[str, dict[str, str]] = field(
        default_factory=lambda: _copy(DEFAULT_SIDECAR_RESOURCES)
    )


def _copy(resources: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    return {k: dict(v) for k, v in resources.items()}


def _resources(
    section: ResourcesSection | None, default: dict[str, dict[str, str]]
) -> dict[str, dict[str, str]]:
    if section is None:
        return _copy(default)
    out = {}
    for kind, values in (("requests", section.requests), ("limits", section.limits)):
        if values:
            out[kind] = {name: str(quantity) for name, quantity in values.items()}
    return out


_AT = re.compile(r"^(?P<reason>.*?)(?: - at (?P<key>`key` in )?`\$(?P<path>[^`]*)`)?$", re.DOTALL)
_OWN_CHECKS = ("exactly one of", "only with", "at most one of")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]*)`$")
_SEGMENT = re.compile(r"\.([^.\[]+)|\[([^\]]*)\]")


def _segments(path: str, raw: Any) -> list[str | int]:
    """``$.a.b[0]`` (without the ``$``) as ["a", "b", 0]; a map entry (``[...]``) by its key."""
    out: list[str | int] = []
    for name, index in _SEGMENT.findall(path):
        if name:
            out.append(name)
        elif index == "...":
            out.append(_bad_quantity_key(_lookup(raw, out)))
        else:
            out.append(int(index))
    return out


def _bad_quantity_key(resources: Any) -> str:
    # msgspec does not name the key of a bad map value; the only maps here hold quantities.
    for key, value in resources.items() if isinstance(resources, Mapping) else ():
        try:
            msgspec.convert(value, Quantity)
        except msgspec.ValidationError:
            return str(key)
    return "..."


def _lookup(raw: Any, segments: list[str | int]) -> Any:
    for seg in segments:
        in_map = isinstance(raw, Mapping) and seg in raw
        if in_map or (isinstance(raw, list) and isinstance(seg, int) and seg < len(raw)):
            raw = raw[seg]
        else:
            return None
    return raw


def _struct_at(segments: list[str | int]) -> type[msgspec.Struct] | None:
    """The Struct that describes the mapping at ``segments`` (for the list of its known keys)."""
    struct: type[msgspec.Struct] = ConfigFile
    for seg in segments:
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        found = next((f for f in info.fields if f.encode_name == seg), None)
        if found is None:
            return None
        inner = found.type
        if isinstance(inner, msgspec.inspect.UnionType):
            inner = next((t for t in inner.types if isinstance(t, msgspec.inspect.StructType)), inner)
        if not isinstance(inner, msgspec.inspect.StructType):
            return None
        struct = inner.cls
    return struct


def _message(exc: msgspec.ValidationError, raw: Any) -> str:
    """``msgspec``'s error as this module's: the key, the value found, what is allowed."""
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    reason, path = match["reason"], match["path"] or ""
    segments = _segments(path, raw)
    if match["key"]:
        return f"config {_display(segments)} is not valid: every resource name must be non-empty"
    unknown = _UNKNOWN.match(reason)
    if unknown:
        struct = _struct_at(segments)
        known = sorted(f.encode_name for f in msgspec.structs.fields(struct)) if struct else []
        key = _display([*segments, unknown["field"]])
        return f"config {key} is not valid: it is not a known key; known keys: {', '.join(known)}"
    key = _display(segments) or "(top level)"
    pattern_key = _pattern_key(segments)
    value = _lookup(raw, segments) if segments else type(raw).__name__
    if reason.startswith(_OWN_CHECKS):
        allowed = reason  # raised by a Struct's own __post_init__: already in this module's words
    else:
        allowed = _ALLOWED.get(pattern_key, reason[:1].lower() + reason[1:])
    return f"config {key}={value!r} is not valid: {allowed}"


def _display(segments: list[str | int]) -> str:
    """How a message names a key: ``store.hostPath``, ``capabilities[0]``, ``limits[memory]``."""
    out = ""
    for i, seg in enumerate(segments):
        if isinstance(seg, int) or (i and segments[i - 1] in ("requests", "limits")):
            out += f"[{seg}]"
        else:
            out += ("." if out else "") + seg
    return out


def _pattern_key(segments: list[str | int]) -> str:
    """The ``_ALLOWED`` key of a path: list indexes and resource names as ``[]``."""
    out = ""
    for i, seg in enumerate(segments):
        # requests/limits are free-form maps: their keys are resource names, not config keys.
        if isinstance(seg, int) or (i and segments[i - 1] in ("requests", "limits")):
            out += "[]"
        else:
            out += ("." if out else "") + seg
    return out


def parse_config(raw: Any) -> WebhookConfig:
    """A checked :class:`WebhookConfig` from the parsed file (None or {} gives every default)."""
    if raw is None:
        return WebhookConfig()
    try:
        f = msgspec.convert(raw, ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(_message(exc, raw)) from None
    d = WebhookConfig()
    store = d.store
    if f.store is not None:
        store = StoreSource(
            host_path=f.store.host_path,
            claim_name=f.store.claim_name,
            registry=f.store.registry,
            auth_secret_name=f.store.auth_secret_name,
            ca_config_map=f.store.ca_config_map,
            ca_secret=f.store.ca_secret,
            ca_key=f.store.ca_key or DEFAULT_CA_KEY,
        )
    trust = d.trust
    if f.trust is not None:
        trust = TrustSource(secret_name=f.trust.secret_name, config_map_name=f.trust.config_map_name)
    signing_secret, signing_file = d.signing_key_secret, d.signing_key_file
    if f.signing_key is None:
        signing_secret = None  # `signingKey: null`: no pod publishes snapshots
    elif isinstance(f.signing_key, SigningKeySection):
        signing_secret = f.signing_key.secret_name or signing_secret
        signing_file = f.signing_key.file or signing_file
    ready = f.ready or ReadySection()
    sched = f.scheduler or SchedulerSection()
    return WebhookConfig(
        image=f.image or d.image,
        image_pull_policy=f.image_pull_policy or d.image_pull_policy,
        excluded_namespaces=(
            frozenset(f.excluded_namespaces) if f.excluded_namespaces is not None else d.excluded_namespaces
        ),
        tools_command=tuple(f.tools.command) if f.tools and f.tools.command else d.tools_command,
        runtime_host_path=(f.runtime and f.runtime.host_path) or d.runtime_host_path,
        cache_host_path=(f.cache and f.cache.host_path) or d.cache_host_path,
        store=store,
        trust=trust,
        signing_key_secret=signing_secret,
        signing_key_file=signing_file,
        ready_default=ready.default,
        ready_startup_probe=ready.startup_probe,
        env_allowlist=tuple(f.env.allowlist) if f.env and f.env.allowlist is not None else d.env_allowlist,
        capabilities=tuple(f.capabilities) if f.capabilities is not None else d.capabilities,
        extended_resource=bool(sched.extended_resource),
        scheduler_name=sched.name,
        init_resources=_resources(f.init_resources, d.init_resources),
        sidecar_resources=_resources(f.sidecar_resources, d.sidecar_resources),
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
