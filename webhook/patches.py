"""JSON Patch builders, one per part of the injection (in the manner of vault-k8s's agent-inject).

Each builder is pure: it reads the part of the pod it changes and returns the RFC 6902 operations for
it. They share two rules that real API servers demand:

- a list or map that is absent is created whole (``add /spec/volumes [..]``); one that exists is
  appended to (``add /spec/volumes/- ..``) or inserted into, because ``add`` at ``/spec/volumes/-``
  fails when ``volumes`` does not exist;
- every path segment that comes from data (annotation keys, resource names) goes through
  ``webhook.types.pointer``, which escapes ``~`` and ``/``; fixed segments and indexes are written
  out directly (they have neither).

``Prepared`` holds everything that depends only on the configuration (the init containers, the
volumes, the static env and mounts), computed once at start-up and kept as JSON bytes: ``orjson.loads``
of a couple of kilobytes is the cheapest way to hand each answer its own copy, so that no caller can
change the templates by editing a patch it was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from thaw.contract.annotations import EXTENDED_RESOURCE
from thaw.contract.nccl import NCCL_ENV
from thaw.contract.workload import EnvAllowlist
from webhook.config import WebhookConfig
from webhook.types import JsonObject, PatchOp, add, pointer, remove, replace

# Names of what the webhook adds; a pod that already has one of them is refused (a clash, not ours).
TOOLS_CONTAINER = "thaw-tools"
FETCH_CONTAINER = "thaw-fetch"
VOL_TOOLS = "thaw-tools"
VOL_PLAN = "thaw-plan"
VOL_CACHE = "thaw-cache"
VOL_STORE = "thaw-store"
VOL_TRUST = "thaw-trust"
VOL_KEY = "thaw-key"
INIT_CONTAINER_NAMES = (TOOLS_CONTAINER, FETCH_CONTAINER)
VOLUME_NAMES = (VOL_TOOLS, VOL_PLAN, VOL_CACHE, VOL_STORE, VOL_TRUST, VOL_KEY)

# Paths inside the containers (thaw.contract.workload.EXCLUDED_MOUNT_PATHS lists the target's).
TOOLS_DIR = "/thaw"
THAW_BIN = "/thaw/bin/thaw"
# The bundled CRIU (4.2, with its own glibc) copied beside thaw: the workload image has none.
CRIU_BIN = "/thaw/bin/criu"
RUNTIME_BIN = "/opt/thaw/bin/thaw"  # in the Thaw image itself (thaw-fetch runs there)
# The same bundle's CRIU, in the Thaw image: thaw-fetch records its version in the node facts, which
# must equal what the workload's /thaw/bin/criu (a copy of it) records at checkpoint.
RUNTIME_CRIU = "/opt/thaw/bin/criu"
PLAN_DIR = "/run/thaw"
PLAN_FILE = "/run/thaw/plan.json"
CACHE_DIR = "/var/lib/thaw/cache"
STORE_DIR = "/var/lib/thaw/store"
TRUST_DIR = "/etc/thaw/trust"
KEY_DIR = "/etc/thaw/key"
MOUNT_PATHS = (TOOLS_DIR, PLAN_DIR, CACHE_DIR, STORE_DIR, KEY_DIR)

INJECTED_VALUE = "v1"  # thaw.dev/injected: the injection format, so a later webhook can tell versions


def _downward(name: str, field_path: str) -> JsonObject:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field_path}}}


@dataclass(frozen=True, slots=True)
class Prepared:
    """The configuration-dependent parts of every injection, computed once."""

    config: WebhookConfig
    allowlist: EnvAllowlist
    excluded_namespaces: frozenset[str]
    capabilities: tuple[str, ...]
    can_publish: bool  # a signing key Secret is configured
    # {"init": [tools, fetch], "volumes": [...], "mounts": [...], "env": [...]} as JSON, without and
    # with the signing key (volume, mount, THAW_KEY); one orjson.loads gives a fresh copy of all.
    # The fetch container's env stops before THAW_NAME/THAW_WORKLOAD, which fresh() appends.
    parts: bytes
    parts_with_key: bytes

    @classmethod
    def build(cls, config: WebhookConfig) -> Prepared:
        dumps = orjson.dumps
        image = {"image": config.image, "imagePullPolicy": config.image_pull_policy}
        tools = {
            "name": TOOLS_CONTAINER,
            **image,
            "command": list(config.tools_command),
            "volumeMounts": [{"name": VOL_TOOLS, "mountPath": TOOLS_DIR}],
            "resources": config.init_resources,
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        }
        fetch = {
            "name": FETCH_CONTAINER,
            **image,
            "command": [RUNTIME_BIN, "fetch"],
            "env": [
                {"name": "THAW_STORE", "value": STORE_DIR},
                {"name": "THAW_CACHE", "value": CACHE_DIR},
                {"name": "THAW_TRUST", "value": TRUST_DIR},
                {"name": "THAW_PLAN", "value": PLAN_FILE},
                # Not left to the image's own env: without it fetch finds no CRIU ("criu none") and
                # every plan is cold (incompatible with the snapshot's CRIU version).
                {"name": "THAW_CRIU", "value": RUNTIME_CRIU},
            ],
            "volumeMounts": [
                {"name": VOL_PLAN, "mountPath": PLAN_DIR},
                {"name": VOL_CACHE, "mountPath": CACHE_DIR},
                {"name": VOL_STORE, "mountPath": STORE_DIR, "readOnly": True},
                {"name": VOL_TRUST, "mountPath": TRUST_DIR, "readOnly": True},
            ],
            "resources": config.init_resources,
            # The node cache is root-only (snapshots hold whole process memories, secrets included).
            "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
        }
        store: JsonObject
        if config.store.claim_name is not None:
            store = {"name": VOL_STORE, "persistentVolumeClaim": {"claimName": config.store.claim_name}}
        else:
            store = {
                "name": VOL_STORE,
                "hostPath": {"path": config.store.host_path, "type": "DirectoryOrCreate"},
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
            {"name": VOL_PLAN, "emptyDir": {}},
            {"name": VOL_CACHE, "hostPath": {"path": config.cache_host_path, "type": "DirectoryOrCreate"}},
            store,
            trust,
        ]
        key_volume = {
            "name": VOL_KEY,
            "secret": {"secretName": config.signing_key_secret, "optional": True, "defaultMode": 0o400},
        }
        mounts: list[JsonObject] = [
            {"name": VOL_TOOLS, "mountPath": TOOLS_DIR, "readOnly": True},
            # Writable: thaw exec may record its outcome beside the plan (the emptyDir is the pod's own).
            {"name": VOL_PLAN, "mountPath": PLAN_DIR},
            {"name": VOL_CACHE, "mountPath": CACHE_DIR},
            {"name": VOL_STORE, "mountPath": STORE_DIR},
        ]
        key_mount = {"name": VOL_KEY, "mountPath": KEY_DIR, "readOnly": True}
        env: list[JsonObject] = [
            {"name": "THAW_PLAN", "value": PLAN_FILE},
            {"name": "THAW_STORE", "value": STORE_DIR},
            {"name": "THAW_CACHE", "value": CACHE_DIR},
            {"name": "THAW_CRIU", "value": CRIU_BIN},
            _downward("THAW_POD_NAME", "metadata.name"),
            _downward("THAW_POD_NAMESPACE", "metadata.namespace"),
            _downward("THAW_POD_UID", "metadata.uid"),  # names the outcome copy the agent posts as Events
            _downward("THAW_NODE_NAME", "spec.nodeName"),
        ]
        key_env = {"name": "THAW_KEY", "value": f"{KEY_DIR}/{config.signing_key_file}"}
        return cls(
            config=config,
            allowlist=EnvAllowlist.parse(config.env_allowlist),
            excluded_namespaces=config.excluded_namespaces,
            capabilities=config.capabilities,
            can_publish=config.signing_key_secret is not None,
            parts=dumps({"init": [tools, fetch], "volumes": volumes, "mounts": mounts, "env": env}),
            parts_with_key=dumps(
                {
                    "init": [tools, fetch],
                    "volumes": [*volumes, key_volume],
                    "mounts": [*mounts, key_mount],
                    "env": [*env, key_env],
                }
            ),
        )

    def fresh(self, publish: bool, snapshot: str, workload: str) -> dict[str, list[JsonObject]]:
        """This pod's copy of the parts: init containers, volumes, target mounts and static env."""
        parts: dict[str, list[JsonObject]] = orjson.loads(self.parts_with_key if publish else self.parts)
        parts["init"][1]["env"] += [
            {"name": "THAW_NAME", "value": snapshot},
            {"name": "THAW_WORKLOAD", "value": workload},
        ]
        return parts


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


def env_ops(index: int, existing: Sequence[Any] | None, new: Sequence[JsonObject]) -> list[PatchOp]:
    """Append ``new`` env; a name the container already sets is kept as the user set it (an override)."""
    if existing:
        taken = {e.get("name") for e in existing if isinstance(e, Mapping)}
        new = [e for e in new if e["name"] not in taken]
    return _append(f"/spec/containers/{index}/env", existing, new)


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


# Tensor-parallel workloads (issue 6): the NCCL settings a checkpoint needs (thaw/contract/nccl.py gives each
# one's reason; README "Tensor parallel" the probes and costs), and NCCL's bootstrap sockets between
# ranks kept open across the dump (--tcp-established), which needs TCP repair mode.
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
    return [{"name": k, "value": v} for k, v in TP_ENV]


def extended_resource_ops(index: int, resources: Mapping[str, Any] | None) -> list[PatchOp]:
    """Request and limit 1 ``thaw.dev/restore`` (extended resources need requests == limits).

    kubelet drops extended resources its node does not advertise before admitting a pod
    (``removeMissingExtendedResources``, pkg/kubelet/lifecycle/predicate.go), so the request only
    makes kube-scheduler call the extender that manages it (``managedResources`` with
    ``ignoredByScheduler: true``); it never holds a pod on the node.
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

    httpGet -> ``http(s)://127.0.0.1:PORT/PATH`` (``thaw exec`` probes from inside the pod, so the
    probe's ``host``, meant for kubelet, is not used); tcpSocket and grpc -> ``tcp:PORT``. Named ports
    are looked up in the container's ``ports``.
    """
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
