"""Whether a checkpoint fits (thaw.runtime.room, issue 11.6): the pure decision, the smaps and cgroup
readers against the kernel's formats (a v1 and a v2 hierarchy laid out as sysfs has them), and a
memory cgroup made here read for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.runtime.pods import REPO, in_cgroup, memory_cgroup
from thaw.runtime.gpu import gpu_used_bytes
from thaw.runtime.room import (
    DUMP_MARGIN_BYTES,
    MEMORY_MARGIN_BYTES,
    Need,
    Room,
    cgroup_paths,
    memory_limit_and_use,
    parse_smaps_rollup,
    refusal,
    tree_bytes,
)

GIB = 1 << 30


def _room(**over: object) -> Room:
    values: dict[str, object] = {
        "work": Path("/run/thaw/work"),
        "work_free": 500 * GIB,
        "work_in_memory": False,
        "cache_room": 500 * GIB,
        "memory_limit": None,
        "memory_used": None,
    }
    return Room(**{**values, **over})  # type: ignore[arg-type]


def test_the_dump_estimate_is_memory_plus_gpu_state_plus_margin() -> None:
    need = Need(tree_bytes=2 * GIB, gpu_bytes=16 * GIB)
    assert need.dump_bytes == int(18 * GIB * 1.05) + DUMP_MARGIN_BYTES
    assert Need(tree_bytes=GIB, gpu_bytes=None).dump_bytes == int(GIB * 1.05) + DUMP_MARGIN_BYTES


def test_refused_for_the_work_directory_the_cache_or_the_memory_limit() -> None:
    need = Need(tree_bytes=2 * GIB, gpu_bytes=16 * GIB)
    assert refusal(need, _room()) is None
    why = refusal(need, _room(work_free=10 * GIB))
    assert why is not None and why.startswith("not enough room for the dump: it needs about 19.0 GiB")
    assert "2.0 GiB of memory + 16.0 GiB of GPU state" in why and "/run/thaw/work has 10.0 GiB free" in why
    why = refusal(need, _room(cache_room=5 * GIB))
    assert why is not None and why.startswith("the node cache cannot take the snapshot")
    # The CUDA checkpoint copies GPU memory into host memory: 16 GiB under a 24 GiB limit with 12 used.
    why = refusal(need, _room(memory_limit=24 * GIB, memory_used=12 * GIB))
    assert why is not None and "copies 16.0 GiB of GPU state into host memory" in why
    assert (
        "12.0 GiB is left under its limit of 24.0 GiB" in why and "raise the container's memory limit" in why
    )
    assert refusal(need, _room(memory_limit=64 * GIB, memory_used=12 * GIB)) is None
    # Without CUDA the host copy is nothing; a dump to disk does not count against memory...
    cpu = Need(tree_bytes=GIB, gpu_bytes=0)
    assert refusal(cpu, _room(memory_limit=2 * GIB, memory_used=GIB)) is None
    # ...but a dump to an in-memory emptyDir does.
    why = refusal(cpu, _room(memory_limit=2 * GIB, memory_used=GIB, work_in_memory=True))
    assert why is not None and "which is in memory" in why
    left = 2 * GIB - GIB
    assert cpu.dump_bytes + MEMORY_MARGIN_BYTES > left


def test_smaps_rollup_counts_what_a_dump_carries() -> None:
    text = (
        "55f014386000-7ffcacf5d000 ---p 00000000 00:00 0                          [rollup]\n"
        "Rss:              300000 kB\nPss_Anon:          100 kB\nPss_Shmem:        2048 kB\n"
        "Private_Clean:   150000 kB\nAnonymous:        131072 kB\nSwap:               1024 kB\n"
    )
    assert parse_smaps_rollup(text) == (131072 + 1024 + 2048) * 1024  # not the clean file pages
    assert tree_bytes([os.getpid()]) > 1 << 20  # this process, read for real
    assert tree_bytes([2**22 + 12345]) == 0  # gone: nothing


def test_cgroup_paths_v1_v2_and_hybrid() -> None:
    assert cgroup_paths("0::/kubepods/pod1/ctr\n") == ("/kubepods/pod1/ctr", None)
    hybrid = "4:memory:/process_api/abc\n3:cpu,cpuacct:/x\n0::/\n"
    assert cgroup_paths(hybrid) == ("/", "/process_api/abc")
    assert cgroup_paths("5:cpuacct,memory:/k/p\n") == (None, "/k/p")


def test_memory_limit_v2_lowest_ancestor_and_working_set(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    pod = tmp_path / "kubepods" / "pod1"
    ctr = pod / "ctr"
    ctr.mkdir(parents=True)
    (tmp_path / "kubepods" / "memory.max").write_text("max\n")
    (pod / "memory.max").write_text(str(8 * GIB))  # the pod's limit is lower than the container's
    (ctr / "memory.max").write_text(str(16 * GIB))
    (ctr / "memory.current").write_text(str(5 * GIB))
    (ctr / "memory.stat").write_text(f"anon 100\nfile {3 * GIB}\ninactive_file {2 * GIB}\n")
    assert memory_limit_and_use("0::/kubepods/pod1/ctr\n", tmp_path) == (8 * GIB, 3 * GIB)
    # In the container's own cgroup namespace its cgroup is the root.
    ns = tmp_path / "ns"
    ns.mkdir()
    (ns / "cgroup.controllers").write_text("memory\n")
    (ns / "memory.max").write_text(str(GIB))
    (ns / "memory.current").write_text(str(GIB // 2))
    assert memory_limit_and_use("0::/\n", ns) == (GIB, GIB // 2)
    (ns / "memory.max").write_text("max\n")
    assert memory_limit_and_use("0::/\n", ns) == (None, None)


def test_memory_limit_v1(tmp_path: Path) -> None:
    d = tmp_path / "memory" / "kubepods" / "ctr"
    d.mkdir(parents=True)
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    (d / "memory.limit_in_bytes").write_text(str(4 * GIB))
    (d / "memory.usage_in_bytes").write_text(str(3 * GIB))
    (d / "memory.stat").write_text(f"cache 10\ntotal_inactive_file {GIB}\n")
    assert memory_limit_and_use("7:memory:/kubepods/ctr\n0::/\n", tmp_path) == (4 * GIB, 2 * GIB)


def test_this_machines_cgroup_reads() -> None:
    """In a memory cgroup of its own with a known limit, a process reads that limit (or a lower one
    of an ancestor's, the one the reader found from here) and a working set within it."""
    here, _ = memory_limit_and_use()
    with memory_cgroup(700 << 20) as cgroup:
        out = subprocess.run(
            [*in_cgroup(cgroup), sys.executable, "-c",
             "import json; from thaw.runtime.room import memory_limit_and_use as m; print(json.dumps(m()))"],
            capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
        )  # fmt: skip
    limit, used = json.loads(out.stdout)
    assert limit == min(700 << 20, here or 700 << 20), out.stdout
    assert isinstance(used, int) and 0 < used < limit, out.stdout


def test_gpu_memory_without_nvml_is_unknown_never_an_error() -> None:
    assert gpu_used_bytes([]) == 0  # no GPU open: nothing to copy
    assert gpu_used_bytes([0], lib="libnvidia-ml-absent.so.1") is None
