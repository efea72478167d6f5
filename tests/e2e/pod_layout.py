"""What the webhook's injection must look like on a real pod, in one place.

The injected layout is about to change (a publisher sidecar, read-only snapshot mounts, a runtime
linked rather than copied: notes/POD-LAYOUT.md); the test checks the layout only here, so that
change edits this file and nothing else in tests/e2e.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from webhook.patches import FETCH_CONTAINER, INJECTED_VALUE, THAW_BIN, TOOLS_CONTAINER

# The extended resource that makes kube-scheduler call the extender (DESIGN.md, wire protocols).
EXTENDED_RESOURCE = "thaw.dev/restore"

__all__ = ["check_init_ran", "check_injected", "workload_container"]


def workload_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers: Sequence[Mapping[str, Any]] = pod["spec"]["containers"]
    return containers[0]


def check_injected(
    pod: Mapping[str, Any],
    *,
    image: str,
    command: Sequence[str],
    capabilities: Sequence[str],
    scheduler_name: str,
    ready_url: str,
) -> None:
    """The pod as kube-apiserver stored it carries the whole injection of ``/mutate-restore``."""
    meta = pod["metadata"]
    annotations = meta.get("annotations") or {}
    assert annotations.get("thaw.dev/injected") == INJECTED_VALUE, annotations
    assert len(annotations.get("thaw.dev/workload", "")) == 32, annotations

    init = pod["spec"].get("initContainers") or []
    assert [c["name"] for c in init[:2]] == [TOOLS_CONTAINER, FETCH_CONTAINER], init
    for c in init[:2]:
        assert c["image"] == image and c["imagePullPolicy"] == "Never", c

    target = workload_container(pod)
    assert list(target["command"]) == [THAW_BIN, "exec", "--", *command], target["command"]
    assert "args" not in target or not target["args"], target
    added = set(((target.get("securityContext") or {}).get("capabilities") or {}).get("add") or ())
    assert set(capabilities) <= added, (
        f"capabilities {sorted(added)} lack {sorted(set(capabilities) - added)}"
    )
    env = {e["name"]: e.get("value") for e in target.get("env") or ()}
    assert env.get("THAW_READY") == ready_url, env
    assert env.get("THAW_CHECKPOINT") == "on-ready", env

    # The default install: the second scheduler, which calls the extender for every pod it schedules;
    # no extended resource (autoscalers could not place it: README, "Scheduler wiring").
    assert pod["spec"].get("schedulerName") == scheduler_name, pod["spec"].get("schedulerName")
    resources = target.get("resources") or {}
    for kind in ("requests", "limits"):
        assert EXTENDED_RESOURCE not in (resources.get(kind) or {}), resources


def check_init_ran(pod: Mapping[str, Any]) -> None:
    """Thaw's init containers ran to exit 0."""
    statuses = {s["name"]: s for s in pod["status"].get("initContainerStatuses") or ()}
    for name in (TOOLS_CONTAINER, FETCH_CONTAINER):
        done = ((statuses.get(name) or {}).get("state") or {}).get("terminated")
        assert done and done.get("exitCode") == 0, f"init container {name}: {statuses.get(name)}"
