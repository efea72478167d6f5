"""A server shaped like vLLM V1: a front process that serves HTTP and only asks NVML about the GPU
(as vLLM's API server does, inside an init/shutdown pair), and an engine process, started with
``spawn``, that holds the CUDA context and the model. They talk over a unix socket in /tmp (vLLM:
ZMQ ipc:// sockets there) and pass results through a named shared-memory segment in /dev/shm (vLLM:
its shared-memory broadcast ring). ``MATRIX_NVML_KEEP=1`` leaves NVML initialised in the front, as a
server that queries it on every request might: then the front keeps /dev/nvidia* open."""

from __future__ import annotations

import os
import socket
import struct
import sys
import time
from multiprocessing import get_context, shared_memory
from typing import Any

from bench.gpu.matrix.serve import digest, port_arg, serve

ROWS = 64


def nvml_facts(keep: bool) -> dict[str, Any]:
    try:
        import pynvml
    except ImportError:
        return {"nvml": "not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"nvml": f"unavailable: {exc}"}
    try:
        count = pynvml.nvmlDeviceGetCount()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)) if count else ""
        return {"nvml": "kept initialised" if keep else "shut down", "gpus": count, "name": str(name)}
    finally:
        if not keep:
            pynvml.nvmlShutdown()


def engine(path: str, shm_name: str) -> None:
    import torch

    from bench.gpu.matrix.model import device, fixed_input, mlp

    dev = device()
    model, x = mlp(dev), fixed_input(dev, rows=ROWS)
    shm = shared_memory.SharedMemory(name=shm_name)
    buf = shm.buf
    assert buf is not None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(b"R")
    while conn.recv(1) == b"Q":
        with torch.inference_mode():
            y = model(x)[:, 0].double().cpu().tolist()
        buf[: 8 * ROWS] = struct.pack(f"<{ROWS}d", *y)
        conn.sendall(b"D")


def main(argv: list[str]) -> int:
    facts = nvml_facts(keep=os.environ.get("MATRIX_NVML_KEEP") == "1")
    shm = shared_memory.SharedMemory(create=True, size=8 * ROWS, name=f"vllm_v1_{os.getpid()}")
    buf = shm.buf
    assert buf is not None
    path = f"/tmp/vllm-v1-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proc = get_context("spawn").Process(target=engine, args=(path, shm.name), daemon=True)
    proc.start()
    conn, _ = listener.accept()
    if conn.recv(1) != b"R":
        return 1

    def answer() -> dict[str, Any]:
        t = time.perf_counter()
        conn.sendall(b"Q")
        if conn.recv(1) != b"D":
            raise RuntimeError("the engine went away")
        values = struct.unpack(f"<{ROWS}d", bytes(buf[: 8 * ROWS]))
        return {"digest": digest(values), "ms": round((time.perf_counter() - t) * 1000, 2)}

    answer()
    serve(port_arg(argv), lambda: {k: v for k, v in answer().items() if k != "ms"}, lambda: facts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
