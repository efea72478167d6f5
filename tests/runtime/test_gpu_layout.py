"""Issue 6: the snapshot's GPU layout (ranks and GPU ordinals) and the restore's check of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.needs import requires, root
from thaw.runtime.gpu import container_gpu_problem, gpu_layout, gpu_minors, rank_env, visible_gpu_minors


def test_gpu_minors_only_numbered_devices() -> None:
    targets = [
        "/dev/nvidia3",
        "/dev/nvidiactl",
        "/dev/nvidia-uvm",
        "/dev/nvidia1",
        "/dev/nvidia3",
        "pipe:[9]",
    ]
    assert gpu_minors(targets) == [1, 3]


def test_visible_gpus_from_a_dev_directory(tmp_path: Path) -> None:
    for name in ("nvidia6", "nvidia2", "nvidiactl", "nvidia-uvm-tools", "null"):
        (tmp_path / name).touch()
    assert visible_gpu_minors(tmp_path) == [2, 6]
    assert visible_gpu_minors(tmp_path / "absent") == []


def test_layout_maps_host_minors_to_ordinals_in_lock_order() -> None:
    # A pod given the node's GPUs 2 and 6 sees them as CUDA devices 0 and 1.
    fds = {
        20: {5: "/dev/nvidia6", 6: "/dev/nvidiactl"},
        10: {5: "/dev/nvidia2", 7: "/dev/nvidia-uvm"},
        30: {1: "pipe:[1]"},
    }
    envs = {20: {"RANK": "1", "WORLD_SIZE": "2"}, 10: {"RANK": "0", "WORLD_SIZE": "2"}}
    layout = gpu_layout([10, 20], fds, [2, 6], envs)
    assert layout == {
        "count": 2,
        "ranks": [
            {"pid": 10, "env": {"RANK": "0", "WORLD_SIZE": "2"}, "gpus": [0]},
            {"pid": 20, "env": {"RANK": "1", "WORLD_SIZE": "2"}, "gpus": [1]},
        ],
    }
    assert container_gpu_problem(layout, 2) is None
    uuids = ["GPU-e127b204-c9b7-2af2-5b9f-09825cd678f2", "GPU-ad9af744-de18-081b-7eb9-396651549436"]
    assert gpu_layout([10, 20], fds, [2, 6], envs, uuids) == {**layout, "uuids": uuids}


@pytest.mark.parametrize("visible", [0, 1, 4])
def test_restore_refused_unless_the_gpu_count_matches(visible: int) -> None:
    layout = {"count": 2, "ranks": [{"pid": 10, "env": {}, "gpus": [0]}, {"pid": 20, "env": {}, "gpus": [1]}]}
    why = container_gpu_problem(layout, visible)
    assert why is not None
    assert "2 CUDA processes" in why and "2 GPUs" in why and f"sees {visible}" in why and "[0, 1]" in why


def test_no_cuda_processes_needs_no_gpu() -> None:
    assert container_gpu_problem({"count": 0, "ranks": []}, 3) is None
    assert container_gpu_problem(None, 0) is None


def test_rank_env_reads_only_the_rank_variables() -> None:
    env = rank_env(os.getpid())
    assert set(env) <= {"RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES"}
    assert rank_env(2**22 + 7) == {}  # no such process


@requires(root("mounts in a new mount namespace"))
def test_bench_pod_view_of_dev_hides_only_the_named_devices() -> None:
    # The GPU benchmark gives a pod one GPU fewer this way (as a device plugin would); here the
    # hidden entries are ordinary devices, the mechanism is the same.
    import subprocess

    from bench.gpu.harness import hide_dev_prefix

    script = "ls -a /dev; echo x > /dev/null; test -d /dev/shm && echo shm-ok"
    out = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            *hide_dev_prefix(["zero", "full"]),
            "sh",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert "zero" not in out and "full" not in out
    assert {"null", "random", "shm", "pts", "shm-ok"} <= set(out)
    assert hide_dev_prefix([]) == []
    assert Path("/dev/zero").exists()  # the caller's /dev is untouched


def test_node_facts_count_the_node_the_layout_counts_the_container(tmp_path: Path) -> None:
    """Issue 10.6: a pod given 2 of a node's 8 GPUs. The snapshot's facts are the node's (8, as
    thaw-fetch and the agent see them, so the compat keys match on that node); its GPU layout keeps
    the container's 2, which is what a restore is checked against."""
    import orjson

    from thaw.contract.facts import NodeFacts, compat_key
    from thaw.snapshot.ingest import ingest

    fds = {10: {5: "/dev/nvidia2"}, 20: {5: "/dev/nvidia6"}}
    layout = gpu_layout([10, 20], fds, [2, 6], {10: {"RANK": "0"}, 20: {"RANK": "1"}})
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "thaw-exec.json").write_bytes(orjson.dumps({"format": 1, "gpu": layout}))
    (dump / "pages-1.img").write_bytes(b"\0" * 4096)
    node: NodeFacts = {
        "arch": "x86_64",
        "kernel": "6.18.0",
        "gpu": {"product": "NVIDIA-H200", "count": 8},
        "driver": "580.95.05",
        "criu": "4.2.1",
    }
    done = ingest(
        dump,
        tmp_path / "cache",
        namespace="ns",
        name="m",
        workload="w",
        facts=node,
        key=None,
    )
    m = done.manifest
    assert m["facts"]["gpu"]["count"] == 8 and m["compat"] == compat_key(node)
    assert m["gpu"]["count"] == 2
    assert container_gpu_problem(dict(m["gpu"]), 2) is None  # another pod given 2 GPUs of such a node
    assert container_gpu_problem(dict(m["gpu"]), 8) is not None  # a pod given all 8 is another layout
