"""The mutation: a pure function from (pod, request namespace, prepared config, restore allowed) to
JSON Patch operations and warnings, or a refusal.

No I/O and no clock: the Flask app (``webhook.app``) and the review wrapper (``webhook.review``) are
the only things around it. ``restore_allowed`` says which webhook entry called: kube-apiserver sends
pods from namespaces labelled ``thaw.dev/restore=allowed`` to ``/mutate-restore`` and every other
namespace's to ``/mutate`` (two entries with ``namespaceSelector``), so the webhook never reads
Namespaces itself.

Order of decisions (each one documented in docs/webhook.md):

1. excluded namespace (``kube-system``, the webhook's own): untouched, silently;
2. no ``thaw.dev/snapshot``: untouched;
3. an invalid ``thaw.dev/*`` value: refused (400), on both paths;
4. ``thaw.dev/injected`` already set: untouched (idempotent under ``reinvocationPolicy: IfNeeded``);
5. ``spec.schedulerName`` names another scheduler (neither ``default-scheduler`` nor Thaw's own):
   untouched, with a warning that says why (that scheduler places the pod, not Thaw's wiring);
6. namespace not allowed: untouched, with a warning that says why the pod cold-starts and how to
   allow restore;
7. no target container, target without ``command``, a volume, init container or mount path that
   clashes with Thaw's, a sleep/wake hook given as a path with no http(s) readiness URL to resolve
   it against: refused (400) with what to change;
8. otherwise: the full injection (``webhook.patches``), with warnings for what will not work as the
   user may expect (no readinessProbe: no checkpoint; a mutable image tag; non-root; values of
   webhook-owned keys the user set, which are replaced).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from thaw.contract.annotations import (
    CHECKPOINT,
    CONTAINER,
    HOOK_NAMES,
    INJECTED,
    RESTORE_LABEL,
    RESTORE_LABEL_VALUE,
    WORKLOAD,
    AnnotationError,
    ThawSpec,
    is_dns1123_label,
    parse_spec,
)
from thaw.contract.hooks import HookError, render_hook, resolve_pair
from thaw.contract.workload import (
    CONFIG_MOUNTS,
    REPLICA_ENV,
    config_mounts,
    is_pinned,
    render_names,
    replica_env,
    workload_hash,
)
from webhook import patches as P
from webhook.types import PatchOp


class MalformedPod(ValueError):
    """The object is not shaped like a Pod (a field of the wrong type); it is admitted unchanged."""


@dataclass(frozen=True, slots=True)
class Mutation:
    ops: list[PatchOp] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Refusal:
    code: int  # HTTP-style status code carried in the AdmissionResponse status
    message: str


def _obj(value: Any, where: str) -> Mapping[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return value
    raise MalformedPod(f"{where} is a {type(value).__name__}, not an object")


def _list(value: Any, where: str) -> list[Any] | None:
    if value is None or isinstance(value, list):
        return value
    raise MalformedPod(f"{where} is a {type(value).__name__}, not a list")


# Thaw's own names, as sets once rather than per request (the clash check runs on every injection).
_VOLUME_NAMES = frozenset(P.VOLUME_NAMES)
_INIT_CONTAINER_NAMES = frozenset(P.INIT_CONTAINER_NAMES)
_MOUNT_PATHS = frozenset(P.MOUNT_PATHS)
# What the API server writes when a pod names no scheduler (defaulting runs before admission).
DEFAULT_SCHEDULER = "default-scheduler"


def _names(items: list[Any] | None) -> set[str]:
    return {str(i["name"]) for i in items or () if isinstance(i, Mapping) and isinstance(i.get("name"), str)}


def mutate(pod: Any, namespace: str, prepared: P.Prepared, restore_allowed: bool) -> Mutation | Refusal:
    """What to do with ``pod`` (a Pod object from an AdmissionReview) created in ``namespace``."""
    if namespace in prepared.excluded_namespaces:
        return Mutation()
    pod_obj = _obj(pod, "object")
    if pod_obj is None:
        raise MalformedPod("request.object is missing")
    metadata = _obj(pod_obj.get("metadata"), "metadata") or {}
    annotations = _obj(metadata.get("annotations"), "metadata.annotations")
    try:
        spec = parse_spec(annotations)
    except AnnotationError as exc:
        return Refusal(400, f"thaw: {exc}")
    if spec is None or annotations is None:
        return Mutation()
    if INJECTED in annotations:
        return Mutation()

    pod_spec = _obj(pod_obj.get("spec"), "spec")
    if pod_spec is None:
        raise MalformedPod("spec is missing")
    other = _other_scheduler(pod_spec, prepared.config.scheduler_name)
    if other is not None:
        return Mutation(warnings=[other])
    containers = _list(pod_spec.get("containers"), "spec.containers") or []
    problem = _target_problem(spec, containers)

    if not restore_allowed:
        warning = (
            f"thaw: namespace {namespace!r} is not labelled {RESTORE_LABEL}={RESTORE_LABEL_VALUE}: this pod "
            f"will cold start, without restore. Allow restore with: kubectl label namespace {namespace} "
            f"{RESTORE_LABEL}={RESTORE_LABEL_VALUE}"
        )
        warnings = [warning]
        if isinstance(problem, str):
            warnings.append(f"thaw: also, once allowed, this pod would be refused: {problem}")
        return Mutation(warnings=warnings)

    if isinstance(problem, str):
        return Refusal(400, f"thaw: {problem}")
    if not is_dns1123_label(namespace):
        # kube-apiserver never sends one; it would become part of a hostPath.
        raise MalformedPod(f"the request's namespace {namespace!r} is not a DNS-1123 label")
    index, container = problem
    clash = _clash(pod_spec, container)
    if clash is not None:
        return Refusal(400, f"thaw: {clash}")
    return _inject(spec, pod_spec, annotations, namespace, index, container, prepared)


def _other_scheduler(pod_spec: Mapping[str, Any], own: str | None) -> str | None:
    """Why the pod is left alone when another scheduler is named, or None."""
    name = pod_spec.get("schedulerName")
    if name in (None, "", DEFAULT_SCHEDULER) or name == own:
        return None
    return (
        f"thaw: pod admitted unchanged: spec.schedulerName is {name!r}; Thaw does not take a pod "
        "from its scheduler (queues, gangs, GPU sharing) and restores only pods its own wiring "
        f"places, so it starts cold. To restore it, use {own or DEFAULT_SCHEDULER!r}"
    )


def _target_problem(spec: ThawSpec, containers: list[Any]) -> str | tuple[int, Mapping[str, Any]]:
    """The target container and its index, or why there is none that Thaw can wrap."""
    names = [c.get("name") for c in containers if isinstance(c, Mapping)]
    if spec.container is None:
        if not containers or not isinstance(containers[0], Mapping):
            return "the pod has no containers to restore"
        index, container = 0, containers[0]
    else:
        for i, c in enumerate(containers):
            if isinstance(c, Mapping) and c.get("name") == spec.container:
                index, container = i, c
                break
        else:
            return (
                f"annotation {CONTAINER}={spec.container!r} names no container of this pod: "
                f"allowed values are {', '.join(repr(n) for n in names)}"
            )
    name = container.get("name")
    command = container.get("command")
    if not command:
        return (
            f"container {name!r} has no command: the webhook cannot see the image's entrypoint, and "
            f"`thaw exec` must know what to run when there is no snapshot to restore. Set command "
            f"(and args) to what the image runs, e.g. from `docker inspect --format "
            f"'{{{{.Config.Entrypoint}}}} {{{{.Config.Cmd}}}}' IMAGE`"
        )
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise MalformedPod(f"container {name!r} command is not a list of strings")
    args = container.get("args")
    if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
        raise MalformedPod(f"container {name!r} args is not a list of strings")
    return index, container


def _clash(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> str | None:
    volumes = _list(pod_spec.get("volumes"), "spec.volumes")
    taken = _names(volumes) & _VOLUME_NAMES
    if taken:
        return (
            f"the pod already has a volume named {sorted(taken)[0]!r}; Thaw adds volumes named "
            f"{', '.join(P.VOLUME_NAMES)}: rename yours"
        )
    init = _list(pod_spec.get("initContainers"), "spec.initContainers")
    regular = _list(pod_spec.get("containers"), "spec.containers")
    taken = (_names(init) | _names(regular)) & _INIT_CONTAINER_NAMES
    if taken:
        return (
            f"the pod already has a container named {sorted(taken)[0]!r}; Thaw adds init containers "
            f"named {', '.join(P.INIT_CONTAINER_NAMES)}: rename yours"
        )
    mounts = _list(container.get("volumeMounts"), "volumeMounts") or []
    paths = {str(m.get("mountPath")) for m in mounts if isinstance(m, Mapping)}
    taken = {p for p in paths if p in _MOUNT_PATHS or p == P.CACHE_DIR or p.startswith(P.CACHE_DIR + "/")}
    if taken:
        return (
            f"container {container.get('name')!r} already mounts something at {sorted(taken)[0]!r}; "
            f"Thaw mounts {', '.join(P.MOUNT_PATHS)} and {P.CACHE_DIR}/NAMESPACE/SNAPSHOT there: move yours"
        )
    return None


def _runs_as_non_root(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    for ctx in (
        _obj(container.get("securityContext"), "securityContext"),
        _obj(pod_spec.get("securityContext"), "spec.securityContext"),
    ):
        if ctx is None:
            continue
        user = ctx.get("runAsUser")
        if user is not None:
            return bool(user != 0)
        if ctx.get("runAsNonRoot") is True:
            return True
    return False


def _inject(  # noqa: PLR0917  (private; called once)
    spec: ThawSpec,
    pod_spec: Mapping[str, Any],
    annotations: Mapping[str, Any],
    namespace: str,
    index: int,
    container: Mapping[str, Any],
    prepared: P.Prepared,
) -> Mutation | Refusal:
    config = prepared.config
    name = container.get("name")
    warnings: list[str] = []
    workload = workload_hash(container, prepared.allowlist, namespace)
    checkpoint = spec.checkpoint
    if checkpoint == "on-ready" and not prepared.can_publish:
        checkpoint = "never"
        warnings.append(
            "thaw: no signing key is configured (signingKey), so this pod will not publish a snapshot"
        )

    ready, note = P.ready_target(container, config.ready_default)
    if note is not None:
        warnings.append(f"thaw: container {name!r}: {note}")
    try:  # a path needs the readiness URL's server: known only now, with the container
        hooks = resolve_pair(spec.sleep, spec.wake, ready, HOOK_NAMES)
    except HookError as exc:
        return Refusal(400, f"thaw: container {name!r}: {exc}")
    if checkpoint == "on-ready" and ready is None:
        # Never on-ready without a readiness target: thaw exec could not tell when to snapshot.
        checkpoint = "never"
        warnings.append(
            f"thaw: container {name!r} has no readinessProbe (httpGet, tcpSocket or grpc), so it will "
            f"start but never checkpoint; add one, or env THAW_READY (URL, tcp:PORT or file:PATH), or "
            f"set {CHECKPOINT}: never"
        )
    publish = checkpoint == "on-ready"
    if _runs_as_non_root(pod_spec, container):
        warnings.append(
            f"thaw: container {name!r} runs as non-root: Kubernetes gives added "
            "capabilities only to root processes, so restore will fall back to a cold start"
        )
    image = container.get("image")
    if isinstance(image, str) and not is_pinned(image):
        warnings.append(
            f"thaw: image {image!r} has no digest: if the tag is re-pushed, replicas restore the old "
            "image's memory over the new files; pin it as IMAGE@sha256:..."
        )
    if WORKLOAD in annotations and annotations[WORKLOAD] != workload:
        warnings.append(f"thaw: {WORKLOAD} is set by the webhook; the value in the pod was replaced")
    user_env = _list(container.get("env"), "env")
    forced = P.forced_names_set(user_env, P.IDENTITY_NAMES)
    if forced:
        warnings.append(
            f"thaw: env {', '.join(forced)} (pod identity) is set by the webhook from the downward API; "
            "the value in the pod was replaced"
        )

    parts = prepared.fresh(publish, namespace, spec.snapshot, workload, checkpoint)
    env = parts["env"]
    env.append({"name": "THAW_CHECKPOINT", "value": checkpoint})
    if ready is not None:
        env.append({"name": "THAW_READY", "value": ready})
    if hooks is not None:
        env.append({"name": "THAW_SLEEP", "value": render_hook(hooks[0])})
        env.append({"name": "THAW_WAKE", "value": render_hook(hooks[1])})
    env.append({"name": "THAW_NAME", "value": spec.snapshot})
    env.append({"name": "THAW_WORKLOAD", "value": workload})
    env.append({"name": "THAW_CONTAINER", "value": str(name)})
    env += P.identity_env()
    env.append({"name": REPLICA_ENV, "value": render_names(replica_env(container))})
    volumes = _list(pod_spec.get("volumes"), "spec.volumes")
    env.append({"name": CONFIG_MOUNTS, "value": render_names(config_mounts(container, volumes))})
    env += P.workload_env()
    capabilities = prepared.capabilities
    if P.is_tensor_parallel(spec.tensor_parallel, _obj(container.get("resources"), "resources")):
        env += P.tp_env()
        capabilities = (*capabilities, *(c for c in P.TP_CAPABILITIES if c not in capabilities))

    ops: list[PatchOp] = P.annotation_ops(annotations, {INJECTED: P.INJECTED_VALUE, WORKLOAD: workload})
    ops += P.init_container_ops(pod_spec.get("initContainers"), parts["init"])
    ops += P.volume_ops(volumes, parts["volumes"])
    ops += P.command_ops(index, container)
    ops += P.env_ops(index, user_env, env, P.IDENTITY_NAMES)
    ops += P.mount_ops(index, container.get("volumeMounts"), parts["mounts"])
    ops += P.capability_ops(index, _obj(container.get("securityContext"), "securityContext"), capabilities)
    # A woken replica's server runs (and answers its health check) while its wake hook reloads what
    # it let go of: only <work>/ready says it is done, so a pod with hooks always gets the probe.
    if config.ready_startup_probe or hooks is not None:
        ops += P.startup_probe_ops(index, container)
    if config.extended_resource:
        ops += P.extended_resource_ops(index, _obj(container.get("resources"), "resources"))
    ops += P.scheduler_name_ops(pod_spec, config.scheduler_name)
    return Mutation(ops, warnings)
