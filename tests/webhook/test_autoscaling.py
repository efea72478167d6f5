"""Scale from zero works with the shipped wiring (issue 14.1): the pod the webhook emits, next to the
rules Cluster Autoscaler and Karpenter apply to it, transcribed from their code
(docs/scheduler-wiring.md cites each):

1. **Resources.** Both decide whether a new node would fit a pending pod by simulating it against a
   node template, and neither knows kube-scheduler's extender settings:
   - Cluster Autoscaler runs the scheduler framework's Filter plugins built from the default
     KubeSchedulerConfiguration (``simulator/framework/handle.go``, ``NewHandle``: profile 0, no
     extenders), so NodeResourcesFit has no ``ignoredResources`` and fails a request for a resource
     the template does not list ("Insufficient thaw.dev/restore");
   - Karpenter keeps an instance type only if ``resources.Fits(requests, allocatable)``
     (``pkg/utils/resources/resources.go``): every requested name must be in the allocatable list.
   Rule: every resource the pod requests is one a GPU node advertises.
2. **Scheduler name.** Both take every pod that a scheduler marked ``PodScheduled=False``, reason
   ``Unschedulable``, whatever its ``schedulerName`` (CA: ``utils/kubernetes/listers.go``
   ``isUnschedulable``, narrowed only by ``--allowed-scheduler-names``; Karpenter:
   ``pkg/utils/pod/scheduling.go`` ``IsProvisionable``/``FailedToSchedule``), and only such pods.
   Rule: the pod names a scheduler that the shipped manifests run, so that something marks it
   Unschedulable (and binds it once a node is up).
3. **Thaw still places it.** kube-scheduler calls an extender for a pod only if the extender has no
   ``managedResources`` or the pod requests one of them (``pkg/scheduler/extender.go``,
   ``HTTPExtender.IsInterested``). Rule: the scheduler the pod names calls Thaw's extender for it.

The alternative (``scheduler.extendedResource: true``) breaks rule 1; the test shows that too, so
it can fail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

from tests.conftest import REPO
from tests.webhook.helpers import answer, apply
from webhook.config import parse_config

MANIFESTS = REPO / "manifests" / "base"
# What a GPU node's template advertises (a cloud provider's template, or a running node's
# status.allocatable, from which both autoscalers build theirs): the standard resources, hugepages
# and what the NVIDIA device plugin registers.
GPU_NODE_ALLOCATABLE = {
    "cpu": "191450m",
    "memory": "2003926152Ki",
    "ephemeral-storage": "3500Gi",
    "pods": "110",
    "hugepages-1Gi": "0",
    "hugepages-2Mi": "0",
    "nvidia.com/gpu": "8",
}


def _manifest_data(file: str, configmap: str) -> str:
    for doc in yaml.safe_load_all((MANIFESTS / file).read_text()):
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == configmap:
            [value] = doc["data"].values()
            return str(value)
    raise AssertionError(f"no ConfigMap {configmap} in manifests/base/{file}")


def shipped_webhook_config() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(_manifest_data("webhook.yaml", "thaw-webhook-config"))
    return raw


def shipped_schedulers() -> dict[str, dict[str, Any]]:
    """Profile name -> the extenders entries of the KubeSchedulerConfiguration that serves it."""
    out: dict[str, dict[str, Any]] = {
        "default-scheduler": {"extenders": []}
    }  # the cluster's own (docs/scheduler-wiring.md's other wiring)
    config = yaml.safe_load(_manifest_data("scheduler.yaml", "thaw-scheduler-config"))
    for profile in config["profiles"]:
        out[profile["schedulerName"]] = {"extenders": config.get("extenders", [])}
    return out


def emitted_pod(config: Mapping[str, Any]) -> dict[str, Any]:
    """A one-GPU vLLM pod as kube-apiserver stores it after the webhook (with ``config``)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "qwen-", "annotations": {"thaw.dev/snapshot": "qwen3-8b"}},
        "spec": {
            "schedulerName": "default-scheduler",
            "containers": [
                {
                    "name": "vllm",
                    "image": "vllm/vllm-openai@sha256:" + "ab" * 32,
                    "command": ["vllm", "serve", "Qwen/Qwen3-8B"],
                    "resources": {
                        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
                        "limits": {"nvidia.com/gpu": "1"},
                    },
                    "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
                }
            ],
        },
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": "llm",
            "object": pod,
        },
    }
    status, out = answer(review, restore=True, config=parse_config(config))
    assert status == 200 and "patch" in out["response"], json.dumps(out)
    mutated: dict[str, Any] = apply(pod, out["response"])
    return mutated


def _containers(pod: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield from pod["spec"].get("initContainers") or ()
    yield from pod["spec"]["containers"]


def requested(pod: Mapping[str, Any]) -> set[str]:
    """Every resource name the pod requests (a limit alone defaults the request, for extended
    resources the two must be equal)."""
    names: set[str] = set()
    for c in _containers(pod):
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            names |= {n for n, q in (resources.get(kind) or {}).items() if str(q) not in ("0", "")}
    return names


def fits_a_new_node(pod: Mapping[str, Any], allocatable: Mapping[str, str]) -> list[str]:
    """Rule 1: what the pod requests that the node template does not advertise (empty: it fits)."""
    return sorted(n for n in requested(pod) if n not in allocatable or str(allocatable[n]) == "0")


def extender_interested(pod: Mapping[str, Any], extender: Mapping[str, Any]) -> bool:
    """Rule 3, as HTTPExtender.IsInterested: no managedResources, or one of them requested."""
    managed = {r["name"] for r in extender.get("managedResources") or ()}
    return not managed or bool(managed & requested(pod))


def test_the_shipped_wiring_keeps_scale_from_zero_working() -> None:
    pod = emitted_pod(shipped_webhook_config())
    # 1: nothing a GPU node lacks.
    assert fits_a_new_node(pod, GPU_NODE_ALLOCATABLE) == []
    # 2: a scheduler the manifests run (and so one that marks it Unschedulable).
    schedulers = shipped_schedulers()
    name = pod["spec"]["schedulerName"]
    assert name == "thaw-scheduler" and name in schedulers
    # 3: that scheduler still sends it to Thaw's extender.
    [extender] = schedulers[name]["extenders"]
    assert extender_interested(pod, extender)
    assert extender["ignorable"] is True  # and Thaw down means cold starts, not Pending pods


def test_the_extended_resource_wiring_would_stop_autoscalers() -> None:
    """The alternative docs/scheduler-wiring.md documents, for the default scheduler: the extender
    is called for Thaw pods only, but no node template lists thaw.dev/restore, so neither autoscaler
    adds a node for the pod (nor removes one that runs it: their scale-down simulation is the same
    check)."""
    config = shipped_webhook_config()
    config["scheduler"] = {"extendedResource": True}
    pod = emitted_pod(config)
    assert fits_a_new_node(pod, GPU_NODE_ALLOCATABLE) == ["thaw.dev/restore"]
    assert pod["spec"]["schedulerName"] == "default-scheduler"
    managed = {"managedResources": [{"name": "thaw.dev/restore", "ignoredByScheduler": True}]}
    assert extender_interested(pod, managed)


@pytest.mark.parametrize("config", [{}, {"scheduler": {"name": "thaw-scheduler"}}])
def test_no_wiring_adds_a_resource_nodes_lack(config: dict[str, Any]) -> None:
    # The sidecar and the init containers ask for cpu and memory only.
    assert fits_a_new_node(emitted_pod(config), GPU_NODE_ALLOCATABLE) == []


def test_the_rule_catches_what_it_should() -> None:
    pod = emitted_pod({})
    assert fits_a_new_node(pod, {k: v for k, v in GPU_NODE_ALLOCATABLE.items() if k != "nvidia.com/gpu"}) == [
        "nvidia.com/gpu"
    ]
    assert not extender_interested(pod, {"managedResources": [{"name": "example.com/x"}]})
