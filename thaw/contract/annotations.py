"""The ``thaw.dev/*`` annotation contract (DESIGN.md, "Pod annotations").

Pure: parses and validates a pod's annotations into a :class:`ThawSpec`, or raises
:class:`AnnotationError` with a message that names the key, the value and what is allowed. The
webhook refuses such pods with that message; the extender and the runtime read the same spec.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from thaw.contract.hooks import HookError, check_pair

PREFIX = "thaw.dev/"
SNAPSHOT = "thaw.dev/snapshot"
CONTAINER = "thaw.dev/container"
CHECKPOINT = "thaw.dev/checkpoint"
PLACEMENT = "thaw.dev/placement"
TENSOR_PARALLEL = "thaw.dev/tensor-parallel"
SLEEP = "thaw.dev/sleep"
WAKE = "thaw.dev/wake"
HOOK_NAMES = (f"annotation {SLEEP}", f"annotation {WAKE}")  # how errors name the two
# Set by the webhook, never by users.
INJECTED = "thaw.dev/injected"
WORKLOAD = "thaw.dev/workload"
# Set by the node agent on Node objects.
NODE_FACTS = "thaw.dev/facts"
NODE_CACHE = "thaw.dev/cache"
# Namespace label that grants restore privileges (checked by kube-apiserver's namespaceSelector).
RESTORE_LABEL = "thaw.dev/restore"
RESTORE_LABEL_VALUE = "allowed"

# Extended resource the webhook can request (1) in the target container (scheduler.extendedResource,
# off in the shipped config: autoscalers cannot place such a pod, docs/scheduler-wiring.md), so
# that a scheduler whose extender entry lists it in managedResources (ignoredByScheduler: true)
# calls the extender for Thaw pods only. kubelet drops extended resources its node does not
# advertise before admission (removeMissingExtendedResources), so it never blocks a pod on a node.
EXTENDED_RESOURCE = "thaw.dev/restore"

USER_KEYS = (SNAPSHOT, CONTAINER, CHECKPOINT, PLACEMENT, TENSOR_PARALLEL, SLEEP, WAKE)
WEBHOOK_KEYS = (INJECTED, WORKLOAD)

CheckpointMode = Literal["on-ready", "never"]
Placement = Literal["preferred", "required"]
CHECKPOINT_MODES: tuple[CheckpointMode, ...] = ("on-ready", "never")
PLACEMENTS: tuple[Placement, ...] = ("preferred", "required")
# auto: tensor-parallel where the target container asks for more than one nvidia.com/gpu.
TensorParallel = Literal["auto", "true", "false"]
TENSOR_PARALLEL_MODES: tuple[TensorParallel, ...] = ("auto", "true", "false")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class AnnotationError(ValueError):
    """An invalid ``thaw.dev/*`` value; the message names key, value and what is allowed."""


@dataclass(frozen=True, slots=True)
class ThawSpec:
    snapshot: str
    container: str | None  # None: the pod's first container
    checkpoint: CheckpointMode
    placement: Placement
    tensor_parallel: TensorParallel = "auto"
    # Hooks (thaw.contract.hooks): URLs or paths on the readiness URL's server; both or neither.
    sleep: str | None = None
    wake: str | None = None


def is_dns1123_label(value: str) -> bool:
    return bool(_DNS1123_LABEL.match(value))


def _choice(annotations: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = annotations.get(key, default)
    if value not in allowed:
        raise AnnotationError(
            f"annotation {key}={value!r} is not valid: allowed values are {', '.join(allowed)}"
        )
    return value


def parse_spec(annotations: Mapping[str, str] | None) -> ThawSpec | None:
    """The pod's Thaw request, None when it does not opt in (no ``thaw.dev/snapshot``)."""
    if not annotations or SNAPSHOT not in annotations:
        return None
    snapshot = annotations[SNAPSHOT]
    if not isinstance(snapshot, str) or not is_dns1123_label(snapshot):
        raise AnnotationError(
            f"annotation {SNAPSHOT}={snapshot!r} is not valid: a snapshot name must be a DNS-1123 label "
            "(lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63)"
        )
    container = annotations.get(CONTAINER)
    if container is not None and (not isinstance(container, str) or not is_dns1123_label(container)):
        raise AnnotationError(
            f"annotation {CONTAINER}={container!r} is not valid: it must name one of the pod's "
            "containers (a DNS-1123 label)"
        )
    checkpoint = _choice(annotations, CHECKPOINT, CHECKPOINT_MODES, "on-ready")
    placement = _choice(annotations, PLACEMENT, PLACEMENTS, "preferred")
    tensor_parallel = _choice(annotations, TENSOR_PARALLEL, TENSOR_PARALLEL_MODES, "auto")
    sleep, wake = annotations.get(SLEEP), annotations.get(WAKE)
    try:
        check_pair(sleep, wake, HOOK_NAMES)
    except HookError as exc:
        raise AnnotationError(str(exc)) from exc
    return ThawSpec(
        snapshot=snapshot,
        container=container,
        checkpoint=checkpoint,  # type: ignore[arg-type]  # checked by _choice
        placement=placement,  # type: ignore[arg-type]
        tensor_parallel=tensor_parallel,  # type: ignore[arg-type]
        sleep=sleep,
        wake=wake,
    )
