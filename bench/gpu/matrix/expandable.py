"""PyTorch's ``expandable_segments`` allocator (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
in the pod's env, as users set it): the caching allocator maps physical memory into growing virtual
ranges with the CUDA VMM API (``cuMemCreate``/``cuMemMap``) instead of ``cudaMalloc``. The program
grows and shrinks its segments (tensors of several sizes, some freed) around a small model."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from bench.gpu.matrix.model import answer, device, fixed_input, mlp
from bench.gpu.matrix.serve import port_arg, serve


def main(argv: list[str]) -> int:
    dev = device()
    keep = [torch.full((n << 20,), float(i), device=dev) for i, n in enumerate((1, 64, 3, 256, 17))]
    del keep[1], keep[2]  # holes in the segments
    model, x = mlp(dev), fixed_input(dev)
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")

    def out() -> dict[str, Any]:
        kept = sum(float(t[-1]) for t in keep)
        return {**answer(model, x), "kept": kept}

    out()
    serve(port_arg(argv), out, lambda: {"alloc_conf": conf})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
