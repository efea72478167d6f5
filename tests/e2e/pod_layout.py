"""What the webhook's injection must look like on a real pod, in one place (notes/POD-LAYOUT.md).

The pod kube-apiserver stored after ``/mutate-restore``: ``thaw-tools`` (``thaw install-runtime``)
and ``thaw-fetch`` run to completion, ``thaw-sidecar`` is a native sidecar (an init container with
``restartPolicy: Always``) and the only container with the store read-write, the whole cache and
the signing key; the workload runs ``/thaw/rt/bin/thaw exec -- CMD`` with the plan and its own
snapshots read-only, its work directory, the runtime read-only, and nothing of the store, the key,
the trust or the rest of the cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from webhook.patches import (
    CACHE_DIR,
    FETCH_CONTAINER,
    INJECTED_VALUE,
    INSTALL_RUNTIME,
    KEY_DIR,
    PLAN_DIR,
    RUNTIME_DIR,
    SIDECAR,
    SIDECAR_CONTAINER,
    STORE_DIR,
    THAW_BIN,
    TOOLS_CONTAINER,
    TOOLS_DIR,
    TRUST_DIR,
    VOL_CACHE,
    VOL_KEY,
    VOL_PLAN,
    VOL_RUNTIME,
    VOL_SNAPSHOTS,
    VOL_STORE,
    VOL_TOOLS,
    VOL_TRUST,
    VOL_WORK,
    WORK_DIR,
)

# The extended resource that makes kube-scheduler call the extender (DESIGN.md, wire protocols).
EXTENDED_RESOURCE = "thaw.dev/restore"
INIT = (TOOLS_CONTAINER, FETCH_CONTAINER, SIDECAR_CONTAINER)
# What only Thaw's own containers may get (notes/POD-LAYOUT.md, "Principle").
NEVER_IN_WORKLOAD_ENV = ("THAW_KEY", "THAW_STORE", "THAW_CACHE", "THAW_TRUST", "THAW_REGISTRY_AUTH")

__all__ = ["check_init_ran", "check_injected", "workload_container"]


def workload_container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers: Sequence[Mapping[str, Any]] = pod["spec"]["containers"]
    return containers[0]


def _mounts(container: Mapping[str, Any]) -> dict[str, tuple[str, bool]]:
    """mountPath -> (volume, read-only)."""
    return {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in container.get("volumeMounts") or ()}


def _env(container: Mapping[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or ()}


def check_injected(
    pod: Mapping[str, Any],
    *,
    image: str,
    command: Sequence[str],
    capabilities: Sequence[str],
    scheduler_name: str,
    ready_url: str,
    snapshot: str,
) -> None:
    """The pod as kube-apiserver stored it carries the whole injection of ``/mutate-restore``."""
    meta = pod["metadata"]
    namespace = meta["namespace"]
    annotations = meta.get("annotations") or {}
    assert annotations.get("thaw.dev/injected") == INJECTED_VALUE, annotations
    assert len(annotations.get("thaw.dev/workload", "")) == 32, annotations

    init = {c["name"]: c for c in pod["spec"].get("initContainers") or ()}
    assert list(init)[:3] == list(INIT), list(init)
    for c in init.values():
        assert c["image"] == image and c["imagePullPolicy"] == "Never", c
    assert init[TOOLS_CONTAINER]["command"][-1] == INSTALL_RUNTIME, init[TOOLS_CONTAINER]["command"]
    tools = _mounts(init[TOOLS_CONTAINER])
    assert tools == {TOOLS_DIR: (VOL_TOOLS, False), RUNTIME_DIR: (VOL_RUNTIME, False)}, tools
    caps = (init[TOOLS_CONTAINER].get("securityContext") or {}).get("capabilities") or {}
    assert caps.get("drop") == ["ALL"], caps

    # thaw-fetch: the whole cache to stage into, the store and trust read-only, the plan to write.
    fetch = _mounts(init[FETCH_CONTAINER])
    assert fetch[CACHE_DIR] == (VOL_CACHE, False) and fetch[PLAN_DIR] == (VOL_PLAN, False), fetch
    assert fetch[STORE_DIR] == (VOL_STORE, True) and fetch[TRUST_DIR] == (VOL_TRUST, True), fetch
    assert KEY_DIR not in fetch, fetch

    # thaw-sidecar: a native sidecar, the only one with the store writable and the signing key.
    sidecar = init[SIDECAR_CONTAINER]
    assert sidecar.get("restartPolicy") == "Always", sidecar
    assert sidecar["command"][-1] == SIDECAR, sidecar["command"]
    side = _mounts(sidecar)
    assert side[CACHE_DIR] == (VOL_CACHE, False) and side[STORE_DIR] == (VOL_STORE, False), side
    assert side[KEY_DIR] == (VOL_KEY, True) and side[PLAN_DIR] == (VOL_PLAN, True), side
    assert side[WORK_DIR] == (VOL_WORK, False), side
    side_env = _env(sidecar)
    assert str(side_env.get("THAW_KEY", "")).startswith(KEY_DIR + "/"), side_env
    assert side_env.get("THAW_NAME") == snapshot and side_env.get("THAW_CHECKPOINT") == "on-ready", side_env

    # The workload: wrapped, its own snapshots and the plan read-only, nothing of the node's state.
    target = workload_container(pod)
    assert list(target["command"]) == [THAW_BIN, "exec", "--", *command], target["command"]
    assert "args" not in target or not target["args"], target
    mounts = _mounts(target)
    assert mounts == {
        TOOLS_DIR: (VOL_TOOLS, True),
        RUNTIME_DIR: (VOL_RUNTIME, True),
        PLAN_DIR: (VOL_PLAN, True),
        WORK_DIR: (VOL_WORK, False),
        f"{CACHE_DIR}/{namespace}/{snapshot}": (VOL_SNAPSHOTS, True),
    }, mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    own = volumes[VOL_SNAPSHOTS]["hostPath"]["path"]
    assert own == f"{volumes[VOL_CACHE]['hostPath']['path']}/{namespace}/{snapshot}", volumes[VOL_SNAPSHOTS]
    added = set(((target.get("securityContext") or {}).get("capabilities") or {}).get("add") or ())
    assert set(capabilities) <= added, (
        f"capabilities {sorted(added)} lack {sorted(set(capabilities) - added)}"
    )
    env = _env(target)
    assert env.get("THAW_READY") == ready_url, env
    assert env.get("THAW_CHECKPOINT") == "on-ready", env
    assert not set(NEVER_IN_WORKLOAD_ENV) & set(env), sorted(set(NEVER_IN_WORKLOAD_ENV) & set(env))

    # The default install: the second scheduler, which calls the extender for every pod it schedules;
    # no extended resource (autoscalers could not place it: docs/scheduler-wiring.md).
    assert pod["spec"].get("schedulerName") == scheduler_name, pod["spec"].get("schedulerName")
    resources = target.get("resources") or {}
    for kind in ("requests", "limits"):
        assert EXTENDED_RESOURCE not in (resources.get(kind) or {}), resources


def check_init_ran(pod: Mapping[str, Any]) -> None:
    """Thaw's init containers ran to exit 0, and thaw-sidecar runs beside the workload."""
    statuses = {s["name"]: s for s in pod["status"].get("initContainerStatuses") or ()}
    for name in (TOOLS_CONTAINER, FETCH_CONTAINER):
        done = ((statuses.get(name) or {}).get("state") or {}).get("terminated")
        assert done and done.get("exitCode") == 0, f"init container {name}: {statuses.get(name)}"
    sidecar = statuses.get(SIDECAR_CONTAINER) or {}
    assert (sidecar.get("state") or {}).get("running") and sidecar.get("started"), f"thaw-sidecar: {sidecar}"
    assert not sidecar.get("restartCount"), f"thaw-sidecar restarted: {sidecar}"
