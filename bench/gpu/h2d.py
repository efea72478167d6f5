"""Host-to-device copy rates on this machine, pageable against pinned host memory (issue 12: where
the CUDA restore's time goes; the driver's checkpoint restores GPU memory from the process's
ordinary, pageable host memory). Prints one JSON line.

    python3 bench/gpu/h2d.py [GIB]
"""

from __future__ import annotations

import json
import sys
import time

import torch


def rate(dst: torch.Tensor, src: torch.Tensor, repeat: int = 3) -> float:
    dst.copy_(src, non_blocking=True)  # warm: the first touch maps and registers
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return float(src.numel()) / best / 1e9


def main(argv: list[str]) -> int:
    n = int(float(argv[0]) * (1 << 30)) if argv else 4 << 30
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    pageable = torch.ones(n, dtype=torch.uint8)
    pinned = torch.ones(n, dtype=torch.uint8, pin_memory=True)
    out = {
        "bytes": n,
        "pageable_gb_s": round(rate(dev, pageable), 2),
        "pinned_gb_s": round(rate(dev, pinned), 2),
        "device_to_pinned_gb_s": round(rate(pinned, dev), 2),
    }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
