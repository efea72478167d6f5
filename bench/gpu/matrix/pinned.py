"""Pinned host memory (``cudaHostAlloc`` through ``pin_memory=True``): host staging buffers that the
server copies to and from the GPU with ``non_blocking`` copies on every request, as vLLM's CPU
offload (and its sleep mode level 1) and most data loaders do. 256 MiB each way."""

from __future__ import annotations

import sys
from typing import Any

import torch

from bench.gpu.matrix.model import device
from bench.gpu.matrix.serve import digest, port_arg, serve

N = 64 << 20  # float32 elements: 256 MiB


def main(argv: list[str]) -> int:
    dev = device()
    pin = dev == "cuda"
    g = torch.Generator().manual_seed(0)
    host = torch.empty(N, dtype=torch.float32, pin_memory=pin)
    host.copy_(torch.randn(N, generator=g))
    back = torch.empty(N, dtype=torch.float32, pin_memory=pin)
    gpu = torch.empty(N, dtype=torch.float32, device=dev)

    def answer() -> dict[str, Any]:
        gpu.copy_(host, non_blocking=True)
        y = gpu * 2 + 1
        back.copy_(y, non_blocking=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        return {
            "sample": digest(back[:: 1 << 20].tolist()),
            "pinned": bool(host.is_pinned() and back.is_pinned()),
        }

    answer()
    serve(port_arg(argv), answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
