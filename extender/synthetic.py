"""Synthetic GPU Nodes in the real API shape, for ``--nodes`` files, tests, benchmarks and the demo.

A node built here is what kube-apiserver would return for a Node that the Thaw agent annotated:
``thaw.dev/facts`` from :data:`H100_FACTS`-style facts and ``thaw.dev/cache`` rendered by
:func:`thaw.contract.inventory.render_inventory`, plus the usual labels and status.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import orjson

from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.facts import NodeFacts, compat_key
from thaw.contract.inventory import CachedSnapshot, Inventory, Tier, render_inventory

H100_FACTS: NodeFacts = {
    "arch": "x86_64",
    "kernel": "6.8.0-60-generic",
    "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 8},
    "driver": "580.159.04",
    "criu": "4.2.1",
}
H200_FACTS: NodeFacts = {
    "arch": "x86_64",
    "kernel": "6.8.0-60-generic",
    "gpu": {"product": "NVIDIA-H200", "count": 8},
    "driver": "580.159.04",
    "criu": "4.2.1",
}
WORKLOAD = "sha256:" + "ab" * 32


def cached(
    name: str, size: int, tier: Tier, *, facts: NodeFacts = H100_FACTS, workload: str = WORKLOAD
) -> CachedSnapshot:
    return {
        "name": name,
        "id": "sha256:" + orjson.dumps([name, workload, compat_key(facts)]).hex()[:64].ljust(64, "0"),
        "workload": workload,
        "compat": compat_key(facts),
        "bytes": size,
        "tier": tier,
        "last_used": "2026-11-28T05:40:00Z",
    }


def node(
    name: str,
    *,
    facts: NodeFacts | None = H100_FACTS,
    snapshots: list[CachedSnapshot] | None = None,
    restoring: int = 0,
    gfd: bool = False,
    resource_version: str = "1",
    extra_annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Node object; ``gfd`` adds GPU Feature Discovery labels from ``facts`` and no Thaw facts."""
    annotations: dict[str, str] = {"node.alpha.kubernetes.io/ttl": "0"}
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if facts is not None and gfd:
        labels |= {
            "nvidia.com/gpu.product": facts["gpu"]["product"],
            "nvidia.com/gpu.count": str(facts["gpu"]["count"]),
            "nvidia.com/cuda.driver-version.full": facts["driver"],
        }
    elif facts is not None:
        annotations[NODE_FACTS] = orjson.dumps(facts).decode()
    if snapshots is not None:
        inv: Inventory = {"v": 1, "free_bytes": 500_000_000_000, "snapshots": snapshots}
        if restoring:
            inv["restoring"] = restoring
        annotations[NODE_CACHE] = render_inventory(inv)
    annotations |= extra_annotations or {}
    gpus = str(facts["gpu"]["count"]) if facts else "0"
    return {
        "metadata": {
            "name": name,
            "uid": f"00000000-0000-4000-8000-{zlib.crc32((name).encode()) % 10**12:012d}",
            "resourceVersion": resource_version,
            "creationTimestamp": "2026-11-28T05:40:06Z",
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "capacity": {"cpu": "96", "memory": "1056Gi", "nvidia.com/gpu": gpus, "pods": "110"},
            "allocatable": {"cpu": "95", "memory": "1050Gi", "nvidia.com/gpu": gpus, "pods": "110"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": "2026-11-28T05:40:06Z",
                    "lastTransitionTime": "2026-11-28T05:40:06Z",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                }
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": f"{zlib.crc32((name + 'm').encode()) % 10**32:032d}",
                "systemUUID": f"{zlib.crc32((name + 's').encode()) % 10**32:032d}",
                "bootID": f"{zlib.crc32((name + 'b').encode()) % 10**32:032d}",
                "kubeProxyVersion": "v1.32.2",
                "kernelVersion": facts["kernel"] if facts else "6.8.0-60-generic",
                "osImage": "Ubuntu 24.04.1 LTS",
                "containerRuntimeVersion": "containerd://1.7.24",
                "kubeletVersion": "v1.32.2",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def cluster(
    n: int, *, snapshot: str = "qwen3-8b-vllm", size: int = 18_260_304_524, seed: int = 1
) -> dict[str, Any]:
    """A NodeList of ``n`` GPU nodes: a tenth cache ``snapshot`` (memory or disk), every node holds a
    few other snapshots, some restore in progress, an eighth are H200s (other compat)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        facts = H200_FACTS if i % 8 == 7 else H100_FACTS
        snaps = [
            cached(f"model-{rng.randrange(40)}", rng.randrange(5, 150) * 10**9, "disk", facts=facts)
            for _ in range(3)
        ]
        if i % 10 == 0:
            snaps.append(cached(snapshot, size, "memory" if i % 20 == 0 else "disk", facts=facts))
        items.append(
            node(f"gpu-{i:05d}", facts=facts, snapshots=snaps, restoring=rng.choice([0, 0, 0, 1, 2]))
        )
    return {"apiVersion": "v1", "kind": "NodeList", "metadata": {"resourceVersion": "1000"}, "items": items}
