"""JSON Patch builders, one per part of the injection (in the manner of vault-k8s's agent-inject).

Each builder is pure: it reads the part of the pod it changes and returns the RFC 6902 operations for
it. They share two rules that real API servers demand:

- a list or map that is absent is created whole (``add /spec/volumes [..]``); one that exists is
  appended to (``add /spec/volumes/- ..``) or inserted into, because ``add`` at ``/spec/volumes/-``
  fails when ``volumes`` does not exist;
- every path segment that comes from data (annotation keys, resource names) goes through
  ``webhook.types.pointer``, which escapes ``~`` and ``/``; fixed segments and indexes are written
  out directly (they have neither).

The pod they build is notes/POD-LAYOUT.md's: ``thaw-tools`` (``thaw install-runtime``: the node's copy
of the runtime linked at ``/thaw/rt``), ``thaw-fetch`` (``thaw fetch``: the plan), ``thaw-sidecar`` (a
native sidecar, ``thaw sidecar``: the only container with the store read-write, the signing key and
the whole cache writable), then the user's init containers, and the workload wrapped by ``thaw exec``
with the plan read-only, its own work directory, and its own snapshots read-only.

``Prepared`` holds everything that depends only on the configuration (the init containers, the
volumes, the static env and mounts), computed once at start-up and kept as JSON bytes: ``orjson.loads``
of a couple of kilobytes is the cheapest way to hand each answer its own copy, so that no caller can
change the templates by editing a patch it was given.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from thaw.contract.annotations import EXTENDED_RESOURCE
from thaw.contract.nccl import NCCL_ENV
from thaw.contract.workload import CACHE_MOUNT_ROOT, DEFAULT_ENV, EnvAllowlist
from webhook.config import WebhookConfig
from webhook.types import JsonObject, PatchOp, add, pointer, remove, replace

# Names of what the webhook adds; a pod that already has one of them is refused (a clash, not ours).
TOOLS_CONTAINER = "thaw-tools"
FETCH_CONTAINER = "thaw-fetch"
SIDECAR_CONTAINER = "thaw-sidecar"
VOL_TOOLS = "thaw-tools"  # emptyDir: the link to the runtime
VOL_RUNTIME = "thaw-runtime"  # hostPath: the node's runtime copies
VOL_PLAN = "thaw-plan"  # emptyDir: plan.json, facts.json (thaw-fetch writes; read-only after)
VOL_WORK = "thaw-work"  # emptyDir: what thaw exec and thaw-sidecar hand each other
VOL_STATE = "thaw-state"  # emptyDir: thaw-sidecar's own
VOL_CACHE = "thaw-cache"  # hostPath: the whole node cache (thaw-fetch, thaw-sidecar)
VOL_SNAPSHOTS = "thaw-snapshots"  # hostPath: <cache>/<namespace>/<name> only (the workload, read-only)
VOL_STORE = "thaw-store"
VOL_TRUST = "thaw-trust"
VOL_KEY = "thaw-key"
VOL_REGISTRY_AUTH = "thaw-registry-auth"  # store.authSecretName: thaw-fetch and thaw-sidecar only
VOL_REGISTRY_CA = "thaw-registry-ca"  # store.caConfigMap / store.caSecret: the same two
INIT_CONTAINER_NAMES = (TOOLS_CONTAINER, FETCH_CONTAINER, SIDECAR_CONTAINER)
VOLUME_NAMES = (
    VOL_TOOLS,
    VOL_RUNTIME,
    VOL_PLAN,
    VOL_WORK,
    VOL_STATE,
    VOL_CACHE,
    VOL_SNAPSHOTS,
    VOL_STORE,
    VOL_TRUST,
    VOL_KEY,
    VOL_REGISTRY_AUTH,
    VOL_REGISTRY_CA,
)

# Paths inside the containers (notes/POD-LAYOUT.md; thaw.contract.workload.EXCLUDED_MOUNT_PATHS lists
# the target's, which never count in the workload hash).
TOOLS_DIR = "/thaw"
RUNTIME_LINK = "/thaw/rt"  # thaw install-runtime: -> RUNTIME_DIR/<bundle id>
THAW_BIN = RUNTIME_LINK + "/bin/thaw"
# The bundled CRIU (4.2, with its own glibc) beside thaw: the workload image has none.
CRIU_BIN = RUNTIME_LINK + "/bin/criu"
RUNTIME_DIR = "/var/lib/thaw/runtime"
IMAGE_RUNTIME = "/opt/thaw"  # the runtime bundle in the Thaw image itself
RUNTIME_BIN = IMAGE_RUNTIME + "/bin/thaw"  # what thaw-tools, thaw-fetch and thaw-sidecar run
# The same bundle's CRIU, in the Thaw image: thaw-fetch records its version in the node facts, which
# must equal what the workload's /thaw/rt/bin/criu (the same bundle) records at checkpoint.
RUNTIME_CRIU = IMAGE_RUNTIME + "/bin/criu"
PLAN_DIR = "/run/thaw/plan"
PLAN_FILE = PLAN_DIR + "/plan.json"
WORK_DIR = "/run/thaw/work"
OUTCOME_FILE = WORK_DIR + "/outcome.json"
READY_FILE = WORK_DIR + "/ready"  # thaw exec: written once nothing of Thaw holds readiness back
STATE_DIR = "/run/thaw/state"
CACHE_DIR = CACHE_MOUNT_ROOT
STORE_DIR = "/var/lib/thaw/store"
TRUST_DIR = "/etc/thaw/trust"
KEY_DIR = "/etc/thaw/key"
REGISTRY_AUTH_DIR = "/etc/thaw/registry-auth"  # THAW_REGISTRY_AUTH: the Secret's .dockerconfigjson
REGISTRY_CA_DIR = "/etc/thaw/registry-ca"
# The target container's mounts (its snapshots' path is CACHE_DIR/<namespace>/<name>).
MOUNT_PATHS = (TOOLS_DIR, RUNTIME_DIR, PLAN_DIR, WORK_DIR)  # all in workload.EXCLUDED_MOUNT_PATHS

# The runtime's commands and the env names of their flags (thaw/cli.py: every flag falls back to
# THAW_<FLAG>). Each name the runtime may still rename is here once.
INSTALL_RUNTIME = "install-runtime"
SIDECAR = "sidecar"
ENV_WORK = "THAW_WORK"  # --work: thaw exec and thaw sidecar
ENV_STATE = "THAW_STATE"  # --state: thaw sidecar's own directory
ENV_NAMESPACE = "THAW_NAMESPACE"  # --namespace: thaw fetch (the cache and store are per namespace)
ENV_RUNTIME_DIR = "THAW_RUNTIME_DIR"  # --runtime-dir: thaw install-runtime
ENV_LINK = "THAW_LINK"  # --link: thaw install-runtime
ENV_OUTCOME = "THAW_OUTCOME"  # --outcome: thaw exec (the plan directory is read-only)

# Pod identity, from the downward API, set by the webhook on every Thaw container and never left to
# the user: a value the user set is replaced (with a warning). The agent trusts none of it for
# Events (it reads the API object by uid), but the sidecar signs with it.
IDENTITY: tuple[tuple[str, str], ...] = (
    ("THAW_POD_NAME", "metadata.name"),
    ("THAW_POD_NAMESPACE", "metadata.namespace"),
    ("THAW_POD_UID", "metadata.uid"),
    ("THAW_NODE_NAME", "spec.nodeName"),
)
IDENTITY_NAMES = frozenset(name for name, _ in IDENTITY)

# The exec startupProbe that holds the pod's readiness until thaw exec writes READY_FILE
# (config ready.startupProbe; `thaw healthcheck` exits 0 when the file exists and is younger than
# --max-age, here longer than any pod lives). Its budget covers thaw exec's --ready-timeout (1800 s):
# a startupProbe that runs out kills the container.
READY_PROBE: JsonObject = {
    "exec": {"command": [THAW_BIN, "healthcheck", "--file", READY_FILE, "--max-age", str(100 * 365 * 86400)]},
    "periodSeconds": 1,  # the pod is Ready at most a second after the file: restores take ~2 s now
    "timeoutSeconds": 10,
    "failureThreshold": 2000,
}
_READY_PROBE_JSON = orjson.dumps(READY_PROBE)  # each answer loads its own copy (as Prepared's parts)

INJECTED_VALUE = "v2"  # thaw.dev/injected: the injection format (v2: notes/POD-LAYOUT.md's pod)


def _downward(name: str, field_path: str) -> JsonObject:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


def identity_env() -> list[JsonObject]:
    return [_downward(name, path) for name, path in IDENTITY]


def _ro(volume: str, path: str) -> JsonObject:
    return {"name": volume, "mountPath": path, "readOnly": True}


def _rw(volume: str, path: str) -> JsonObject:
    return {"name": volume, "mountPath": path}


def _env(name: str, value: str) -> JsonObject:
    return {"name": name, "value": value}


@dataclass(frozen=True, slots=True)
class Prepared:
    """The configuration-dependent parts of every injection, computed once."""

    config: WebhookConfig
    allowlist: EnvAllowlist
    excluded_namespaces: frozenset[str]
    capabilities: tuple[str, ...]
    can_publish: bool  # a signing key Secret is configured
    # {"init": [tools, fetch, sidecar], "volumes": [...], "mounts": [...], "env": [...]} as JSON,
    # without and with the signing key (volume, sidecar mount, THAW_KEY); one orjson.loads gives a
    # fresh copy of all. fresh() appends what depends on the pod (snapshot name, workload, namespace).
    parts: bytes
    parts_with_key: bytes

    @classmethod
    def build(cls, config: WebhookConfig) -> Prepared:
        dumps = orjson.dumps
        image = {"image": config.image, "imagePullPolicy": config.image_pull_policy}
        root: JsonObject = {"runAsUser": 0, "runAsNonRoot": False}
        tools = {
            "name": TOOLS_CONTAINER,
            **image,
            "command": list(config.tools_command),
            "env": [_env(ENV_RUNTIME_DIR, RUNTIME_DIR), _env(ENV_LINK, RUNTIME_LINK)],
            "volumeMounts": [_rw(VOL_TOOLS, TOOLS_DIR), _rw(VOL_RUNTIME, RUNTIME_DIR)],
            "resources": config.init_resources,
            # Root to write the root-owned hostPath, and nothing more: it copies and links files.
            "securityContext": root | {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
        store_env, store_volumes, store_ro, store_rw = _store_parts(config)
        fetch = {
            "name": FETCH_CONTAINER,
            **image,
            "command": [RUNTIME_BIN, "fetch"],
            "env": [
                *store_env,
                _env("THAW_CACHE", CACHE_DIR),
                _env("THAW_TRUST", TRUST_DIR),
                _env("THAW_PLAN", PLAN_FILE),
                # Not left to the image's own env: without it fetch finds no CRIU ("criu none") and
                # every plan is cold (incompatible with the snapshot's CRIU version).
                _env("THAW_CRIU", RUNTIME_CRIU),
                *identity_env(),
            ],
            "volumeMounts": [
                _rw(VOL_PLAN, PLAN_DIR),
                _rw(VOL_CACHE, CACHE_DIR),
                *store_ro,
                _ro(VOL_TRUST, TRUST_DIR),
            ],
            "resources": config.init_resources,
            # The node cache is root-only (snapshots hold whole process memories, secrets included).
            "securityContext": root,
        }
        sidecar = {
            "name": SIDECAR_CONTAINER,
            **image,
            # A native sidecar (Kubernetes >= 1.29): started before the workload, stopped after it,
            # restarted if it exits, and it does not keep a Job's pod from completing.
            "restartPolicy": "Always",
            "command": [RUNTIME_BIN, SIDECAR],
            "env": [
                _env("THAW_CACHE", CACHE_DIR),
                *store_env,
                _env("THAW_PLAN", PLAN_FILE),
                _env(ENV_WORK, WORK_DIR),
                _env(ENV_STATE, STATE_DIR),
                *identity_env(),
            ],
            "volumeMounts": [
                _rw(VOL_CACHE, CACHE_DIR),
                *store_rw,
                _ro(VOL_PLAN, PLAN_DIR),
                _rw(VOL_WORK, WORK_DIR),
                _rw(VOL_STATE, STATE_DIR),
            ],
            "resources": config.sidecar_resources,
            "securityContext": root,
        }
        # optional: a Secret/ConfigMap missing from the pod's namespace must not hold the pod in
        # ContainerCreating: no trusted key means a cold plan, no signing key means no publishing.
        trust: JsonObject
        if config.trust.config_map_name is not None:
            trust = {"name": VOL_TRUST, "configMap": {"name": config.trust.config_map_name, "optional": True}}
        else:
            trust = {"name": VOL_TRUST, "secret": {"secretName": config.trust.secret_name, "optional": True}}
        volumes: list[JsonObject] = [
            {"name": VOL_TOOLS, "emptyDir": {}},
            {
                "name": VOL_RUNTIME,
                "hostPath": {"path": config.runtime_host_path, "type": "DirectoryOrCreate"},
            },
            {"name": VOL_PLAN, "emptyDir": {}},
            {"name": VOL_WORK, "emptyDir": {}},
            {"name": VOL_STATE, "emptyDir": {}},
            {"name": VOL_CACHE, "hostPath": {"path": config.cache_host_path, "type": "DirectoryOrCreate"}},
            *store_volumes,
            trust,
        ]
        key_volume = {
            "name": VOL_KEY,
            "secret": {"secretName": config.signing_key_secret, "optional": True, "defaultMode": 0o400},
        }
        mounts: list[JsonObject] = [
            _ro(VOL_TOOLS, TOOLS_DIR),
            _ro(VOL_RUNTIME, RUNTIME_DIR),  # what /thaw/rt links to
            _ro(VOL_PLAN, PLAN_DIR),
            _rw(VOL_WORK, WORK_DIR),
        ]
        env: list[JsonObject] = [
            _env("THAW_PLAN", PLAN_FILE),
            _env(ENV_WORK, WORK_DIR),
            _env(ENV_OUTCOME, OUTCOME_FILE),
            _env("THAW_CRIU", CRIU_BIN),
        ]
        # The key goes to thaw-sidecar only: the workload never sees it.
        sidecar_with_key = {
            **sidecar,
            "env": [*sidecar["env"], _env("THAW_KEY", f"{KEY_DIR}/{config.signing_key_file}")],
            "volumeMounts": [*sidecar["volumeMounts"], _ro(VOL_KEY, KEY_DIR)],
        }
        return cls(
            config=config,
            allowlist=EnvAllowlist.parse(config.env_allowlist),
            excluded_namespaces=config.excluded_namespaces,
            capabilities=config.capabilities,
            can_publish=config.signing_key_secret is not None,
            parts=dumps({"init": [tools, fetch, sidecar], "volumes": volumes, "mounts": mounts, "env": env}),
            parts_with_key=dumps(
                {
                    "init": [tools, fetch, sidecar_with_key],
                    "volumes": [*volumes, key_volume],
                    "mounts": mounts,
                    "env": env,
                }
            ),
        )

    def fresh(
        self, publish: bool, namespace: str, snapshot: str, workload: str, checkpoint: str
    ) -> dict[str, list[JsonObject]]:
        """This pod's copy of the parts: init containers, volumes, target mounts and static env.

        ``namespace`` and ``snapshot`` must be DNS-1123 labels (checked by the caller): they become a
        hostPath.
        """
        parts: dict[str, list[JsonObject]] = orjson.loads(self.parts_with_key if publish else self.parts)
        _, fetch, sidecar = parts["init"]
        pod = [_env("THAW_NAME", snapshot), _env("THAW_WORKLOAD", workload)]
        fetch["env"] += [*pod, _env(ENV_NAMESPACE, namespace)]
        sidecar["env"] += [*pod, _env("THAW_CHECKPOINT", checkpoint)]
        own = f"{CACHE_DIR}/{namespace}/{snapshot}"
        parts["volumes"].append(
            {
                "name": VOL_SNAPSHOTS,
                "hostPath": {
                    "path": f"{self.config.cache_host_path}/{namespace}/{snapshot}",
                    "type": "DirectoryOrCreate",
                },
            }
        )
        parts["mounts"].append(_ro(VOL_SNAPSHOTS, own))  # the same path as thaw-fetch's: the plan's
        return parts


def _store_parts(
    config: WebhookConfig,
) -> tuple[list[JsonObject], list[JsonObject], list[JsonObject], list[JsonObject]]:
    """The store as thaw-fetch and thaw-sidecar get it (never the workload): their env, the pod's
    volumes, thaw-fetch's mounts (read-only) and thaw-sidecar's (the directory store read-write).

    A directory store (hostPath, PVC) is a volume at STORE_DIR. A registry is ``THAW_STORE=oci://...``
    with, where configured, its dockerconfigjson Secret's mount as ``THAW_REGISTRY_AUTH`` (the
    directory: thaw reads its ``.dockerconfigjson``) and its CA as ``THAW_REGISTRY_CA``. Both are
    optional volumes: a Secret missing from the pod's namespace gives a cold plan naming it, never a
    pod stuck in ContainerCreating.
    """
    store = config.store
    if store.registry is None:
        volume: JsonObject
        if store.claim_name is not None:
            volume = {"name": VOL_STORE, "persistentVolumeClaim": {"claimName": store.claim_name}}
        else:
            volume = {"name": VOL_STORE, "hostPath": {"path": store.host_path, "type": "DirectoryOrCreate"}}
        env = [_env("THAW_STORE", STORE_DIR)]
        return env, [volume], [_ro(VOL_STORE, STORE_DIR)], [_rw(VOL_STORE, STORE_DIR)]
    env = [_env("THAW_STORE", store.registry)]
    volumes: list[JsonObject] = []
    mounts: list[JsonObject] = []
    if store.auth_secret_name is not None:
        env.append(_env("THAW_REGISTRY_AUTH", REGISTRY_AUTH_DIR))
        secret = {"secretName": store.auth_secret_name, "optional": True, "defaultMode": 0o400}
        volumes.append({"name": VOL_REGISTRY_AUTH, "secret": secret})
        mounts.append(_ro(VOL_REGISTRY_AUTH, REGISTRY_AUTH_DIR))
    if store.ca_config_map is not None or store.ca_secret is not None:
        env.append(_env("THAW_REGISTRY_CA", f"{REGISTRY_CA_DIR}/{store.ca_key}"))
        if store.ca_secret is not None:
            source: JsonObject = {"secret": {"secretName": store.ca_secret, "optional": True}}
        else:
            source = {"configMap": {"name": store.ca_config_map, "optional": True}}
        volumes.append({"name": VOL_REGISTRY_CA, **source})
        mounts.append(_ro(VOL_REGISTRY_CA, REGISTRY_CA_DIR))
    return env, volumes, mounts, list(mounts)


# --- builders -------------------------------------------------------------------------------------


def annotation_ops(existing: Mapping[str, Any] | None, values: Mapping[str, str]) -> list[PatchOp]:
    """Set ``values`` in ``metadata.annotations`` (``add`` replaces a key that is already there)."""
    if existing is None:
        return [add("/metadata/annotations", dict(values))]
    return [add(pointer("metadata", "annotations", k), v) for k, v in values.items()]


def init_container_ops(existing: Sequence[Any] | None, new: Sequence[JsonObject]) -> list[PatchOp]:
    """Put ``new`` first, in order, before the pod's own init containers."""
    if existing is None:
        return [add("/spec/initContainers", list(new))]
    return [add(f"/spec/initContainers/{i}", c) for i, c in enumerate(new)]


def _append(base: str, existing: Sequence[Any] | None, new: Sequence[Any]) -> list[PatchOp]:
    if not new:
        return []
    if existing is None:
        return [add(base, list(new))]
    return [add(base + "/-", item) for item in new]


def volume_ops(existing: Sequence[Any] | None, new: Sequence[JsonObject]) -> list[PatchOp]:
    return _append("/spec/volumes", existing, new)


def command_ops(index: int, container: Mapping[str, Any]) -> list[PatchOp]:
    """``command`` becomes ``thaw exec -- <command> <args>``; ``args`` is folded in and removed."""
    command = [THAW_BIN, "exec", "--", *container["command"], *(container.get("args") or ())]
    ops: list[PatchOp] = [replace(f"/spec/containers/{index}/command", command)]
    if "args" in container:
        ops.append(remove(f"/spec/containers/{index}/args"))
    return ops


def env_ops(
    index: int,
    existing: Sequence[Any] | None,
    new: Sequence[JsonObject],
    forced: Collection[str] = (),
) -> list[PatchOp]:
    """Append ``new`` env. A name the container already sets is kept as the user set it (an
    override), except the ``forced`` names: every entry of the user's with such a name is replaced by
    ours (env entries of one name: the last wins, so each is replaced, none is left)."""
    base = f"/spec/containers/{index}/env"
    ops: list[PatchOp] = []
    if existing:
        ours = {e["name"]: e for e in new}
        taken: set[Any] = set()
        for i, e in enumerate(existing):
            name = e.get("name") if isinstance(e, Mapping) else None
            taken.add(name)
            if name in forced and name in ours:
                ops.append(replace(f"{base}/{i}", ours[name]))
        new = [e for e in new if e["name"] not in taken]
    return ops + _append(base, existing, new)


def forced_names_set(existing: Sequence[Any] | None, forced: Collection[str]) -> list[str]:
    """The ``forced`` names the user's env sets (they are replaced: the caller warns about them)."""
    found: list[str] = []
    for e in existing or ():
        name = e.get("name") if isinstance(e, Mapping) else None
        if isinstance(name, str) and name in forced and name not in found:
            found.append(name)
    return found


def mount_ops(index: int, existing: Sequence[Any] | None, new: Sequence[JsonObject]) -> list[PatchOp]:
    return _append(f"/spec/containers/{index}/volumeMounts", existing, new)


def capability_ops(
    index: int, security_context: Mapping[str, Any] | None, caps: Sequence[str]
) -> list[PatchOp]:
    """Add ``caps`` to ``securityContext.capabilities.add``, creating each level that is absent."""
    base = f"/spec/containers/{index}/securityContext"
    if security_context is None:
        return [add(base, {"capabilities": {"add": list(caps)}})] if caps else []
    capabilities = security_context.get("capabilities")
    if capabilities is None:
        return [add(base + "/capabilities", {"add": list(caps)})] if caps else []
    present = capabilities.get("add")
    if present is None:
        return [add(base + "/capabilities/add", list(caps))] if caps else []
    have = set(present)
    return [add(base + "/capabilities/add/-", c) for c in caps if c not in have and f"CAP_{c}" not in have]


def startup_probe_ops(index: int, container: Mapping[str, Any]) -> list[PatchOp]:
    """The exec startupProbe on ``READY_FILE``, unless the container has its own startupProbe (which
    then decides; thaw exec's readiness gate is not checked)."""
    if container.get("startupProbe") is not None:
        return []
    return [add(f"/spec/containers/{index}/startupProbe", orjson.loads(_READY_PROBE_JSON))]


# Tensor-parallel workloads (issue 6): the NCCL settings a checkpoint needs (thaw/contract/nccl.py gives
# each one's reason; docs/tensor-parallel.md the probes and costs), and NCCL's bootstrap sockets
# between ranks kept open across the dump (--tcp-established), which needs TCP repair mode.
TP_ENV: tuple[tuple[str, str], ...] = (*NCCL_ENV, ("THAW_TCP_ESTABLISHED", "true"))
TP_CAPABILITIES = ("NET_ADMIN",)  # TCP repair mode for the established connections
GPU_RESOURCE = "nvidia.com/gpu"


def requested_gpus(resources: Mapping[str, Any] | None) -> int:
    """The container's nvidia.com/gpu count (limits, else requests); 0 where absent or unreadable."""
    for part in ("limits", "requests"):
        section = (resources or {}).get(part)
        if isinstance(section, Mapping) and GPU_RESOURCE in section:
            try:
                return int(str(section[GPU_RESOURCE]))
            except ValueError:
                return 0
    return 0


def is_tensor_parallel(mode: str, resources: Mapping[str, Any] | None) -> bool:
    """The annotation's answer, or for ``auto``: more than one GPU asked for."""
    return mode == "true" or (mode == "auto" and requested_gpus(resources) > 1)


def tp_env() -> list[JsonObject]:
    return [_env(k, v) for k, v in TP_ENV]


def workload_env() -> list[JsonObject]:
    return [_env(k, v) for k, v in DEFAULT_ENV]


def extended_resource_ops(index: int, resources: Mapping[str, Any] | None) -> list[PatchOp]:
    """Request and limit 1 ``thaw.dev/restore`` (extended resources need requests == limits).

    kubelet drops extended resources its node does not advertise before admitting a pod
    (``removeMissingExtendedResources``, pkg/kubelet/lifecycle/predicate.go), so the request only
    makes kube-scheduler call the extender that manages it (``managedResources`` with
    ``ignoredByScheduler: true``); it never holds a pod on the node. But Cluster Autoscaler and
    Karpenter require a node to advertise it (docs/scheduler-wiring.md): off in the shipped config.
    """
    base = f"/spec/containers/{index}/resources"
    if resources is None:
        return [add(base, {"requests": {EXTENDED_RESOURCE: "1"}, "limits": {EXTENDED_RESOURCE: "1"}})]
    ops: list[PatchOp] = []
    for kind in ("requests", "limits"):
        if resources.get(kind) is None:
            ops.append(add(f"{base}/{kind}", {EXTENDED_RESOURCE: "1"}))
        else:
            ops.append(add(f"{base}/{kind}" + pointer(EXTENDED_RESOURCE), "1"))
    return ops


def scheduler_name_ops(spec: Mapping[str, Any], name: str | None) -> list[PatchOp]:
    if name is None or spec.get("schedulerName") == name:
        return []
    return [add("/spec/schedulerName", name)]


def ready_target(container: Mapping[str, Any], default: str | None) -> tuple[str | None, str | None]:
    """``THAW_READY`` from the container's readinessProbe, and a note when it had to guess.

    A literal ``THAW_READY`` in the container's env wins (the user's override). httpGet ->
    ``http(s)://127.0.0.1:PORT/PATH`` (``thaw exec`` probes from inside the pod, so the probe's
    ``host``, meant for kubelet, is not used); tcpSocket and grpc -> ``tcp:PORT``. Named ports are
    looked up in the container's ``ports``.
    """
    for e in container.get("env") or ():
        if isinstance(e, Mapping) and e.get("name") == "THAW_READY" and isinstance(e.get("value"), str):
            return (e["value"] or None), None
    probe = container.get("readinessProbe")
    if not isinstance(probe, Mapping):
        return default, None
    for kind in ("httpGet", "tcpSocket", "grpc"):
        action = probe.get(kind)
        if not isinstance(action, Mapping):
            continue
        port = _resolve_port(container, action.get("port"))
        if port is None:
            return (
                default,
                f"readinessProbe.{kind}.port {action.get('port')!r} names no port of the container",
            )
        if kind == "httpGet":
            scheme = "https" if str(action.get("scheme", "HTTP")).upper() == "HTTPS" else "http"
            path = action.get("path") or "/"
            if not isinstance(path, str) or not path.startswith("/"):
                path = "/" + str(path)
            return f"{scheme}://127.0.0.1:{port}{path}", None
        return f"tcp:{port}", None
    return default, None


def _resolve_port(container: Mapping[str, Any], port: Any) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 0 < port < 65536 else None
    if isinstance(port, str):
        if port.isdigit():
            return _resolve_port(container, int(port))
        for p in container.get("ports") or ():
            if isinstance(p, Mapping) and p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None
