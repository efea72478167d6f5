"""``thaw status`` through the CLI against tests/fakekube.py, and the table as a pure function."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.fakekube import FakeKube, running
from tests.runtime.snapshots import FACTS, facts, kubeconfig, node
from thaw.contract.annotations import NODE_CACHE, NODE_FACTS
from thaw.contract.canonical import canonical_json
from thaw.contract.facts import compat_key
from thaw.dev.sandbox import thaw_cli
from thaw.node.status import node_status, render_table

SNAP = {
    "name": "qwen3-8b-vllm",
    "id": "sha256:" + "ab" * 32,
    "workload": "0123456789abcdef",
    "compat": compat_key(FACTS),
    "bytes": 18_260_304_524,
    "tier": "disk",
    "last_used": "2026-11-28T05:40:00Z",
}
INV = {"v": 1, "free_bytes": 912_000_000_000, "snapshots": [SNAP], "restoring": 1}


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with running() as k:
        k.add(
            node(
                "gpu-a", {NODE_FACTS: canonical_json(FACTS).decode(), NODE_CACHE: orjson.dumps(INV).decode()}
            )
        )
        k.add(node("gpu-b", {NODE_FACTS: '{"arch": 1}', NODE_CACHE: '{"v": 2}'}))
        k.add(
            node(
                "gpu-c",
                labels={"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.count": "8"},
            )
        )
        yield k


def test_status_table_from_the_cluster(kube: FakeKube, tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", kube.url))}
    out = thaw_cli("status", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == [
        "NODE",
        "GPU",
        "DRIVER",
        "CRIU",
        "KERNEL",
        "COMPAT",
        "FREE",
        "RESTORING",
        "SNAPSHOTS",
    ]
    a = next(i for i, line in enumerate(lines) if line.startswith("gpu-a"))
    assert "8x NVIDIA-H100-80GB-HBM3" in lines[a] and compat_key(FACTS) in lines[a] and "912.0 GB" in lines[a]
    assert lines[a].split()[-2:] == ["1", "1"]  # restoring, snapshots
    assert (
        "qwen3-8b-vllm" in lines[a + 1]
        and "18.3 GB" in lines[a + 1]
        and "2026-11-28T05:40:00Z" in lines[a + 1]
    )
    b = next(i for i, line in enumerate(lines) if line.startswith("gpu-b"))
    assert "invalid thaw.dev/facts" in lines[b + 1] and "unsupported version" in lines[b + 2]
    c = next(line for line in lines if line.startswith("gpu-c"))
    assert "8x NVIDIA-H200 (GFD)" in c


def test_status_json(kube: FakeKube, tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", kube.url))}
    out = thaw_cli("status", "--output", "json", env=env)
    assert out.returncode == 0, out.stderr
    rows = {r["node"]: r for r in orjson.loads(out.stdout)}
    assert rows["gpu-a"]["facts"] == FACTS and rows["gpu-a"]["cache"] == INV
    assert rows["gpu-a"]["compat"] == compat_key(FACTS)
    assert rows["gpu-b"]["facts"] is None and "invalid" in rows["gpu-b"]["facts_error"]
    assert rows["gpu-c"]["gfd"] == {"nvidia.com/gpu.product": "NVIDIA-H200", "nvidia.com/gpu.count": "8"}


def test_status_without_a_cluster_fails_with_one_line(tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:9"))}
    out = thaw_cli("status", env=env)
    assert out.returncode == 1
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("thaw status:")


def test_render_table_pure() -> None:
    rows = [
        node_status(
            "n1", {NODE_FACTS: canonical_json(facts(gpu={"product": "none", "count": 0})).decode()}, None
        ),
        node_status("n0", None, None),
    ]
    table = render_table(rows).splitlines()
    assert table[1].startswith("n0") and "no thaw.dev/facts" in table[2]
    assert table[4].startswith("n1") and " none " in table[4]
    assert render_table([]).splitlines()[-1] == "(no nodes)"
