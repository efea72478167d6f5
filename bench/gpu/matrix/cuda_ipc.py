"""CUDA IPC between two processes: the server puts a GPU tensor into a ``torch.multiprocessing``
queue and a spawned worker opens it (``cudaIpcGetMemHandle``/``cudaIpcOpenMemHandle`` under the
hood, as vLLM's custom all-reduce and NCCL's P2P transport do) and answers from it. The CUDA
checkpoint supports IPC memory only from driver 610 (NVIDIA/cuda-checkpoint). Each process logs what
the IPC open changed in its GPU device files and mappings (``ipc-diag``), to find a way to see it
from outside."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.multiprocessing as mp

from bench.gpu.matrix.serve import digest, port_arg, serve


def gpu_files() -> dict[str, Any]:
    """This process's /dev/nvidia* descriptors and mappings (what /proc shows from outside)."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/dev/nvidia") or target.startswith("anon_inode"):
            fds[fd] = target
    with open("/proc/self/maps") as f:
        maps = [ln.split(None, 5)[-1].strip() for ln in f if "/dev/nvidia" in ln]
    counts: dict[str, int] = {}
    for m in maps:
        counts[m] = counts.get(m, 0) + 1
    return {"fds": fds, "mappings": counts}


def worker(queue: Any, conn: Any) -> None:
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    before = gpu_files()
    shared = queue.get()  # opened through CUDA IPC
    torch.cuda.synchronize()
    print("ipc-diag worker " + json.dumps({"before": before, "after": gpu_files()}), flush=True)
    conn.send("ready")
    while True:
        conn.recv()
        conn.send(float((shared * 3).sum()))


def main(argv: list[str]) -> int:
    ctx = mp.get_context("spawn")
    queue, (here, there) = ctx.Queue(), ctx.Pipe()
    tensor = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    before = gpu_files()
    proc = ctx.Process(target=worker, args=(queue, there), daemon=True)
    proc.start()
    queue.put(tensor)
    if here.recv() != "ready":
        return 1
    print("ipc-diag server " + json.dumps({"before": before, "after": gpu_files()}), flush=True)

    def answer() -> dict[str, Any]:
        here.send("go")
        return {"worker": here.recv(), "own": digest([float(tensor.sum())])}

    answer()
    serve(port_arg(argv), answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
