"""A small fixed-seed torch model the matrix programs compute with: the same weights in every
process, so a restore's answer is compared bit for bit with the checkpointed server's."""

from __future__ import annotations

from typing import Any

import torch

from bench.gpu.matrix.serve import digest


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def mlp(dev: str, width: int = 1024, hidden: int = 4096) -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, width))
        .to(dev)
        .eval()
    )


def fixed_input(dev: str, rows: int = 8, width: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, width, generator=g).to(dev)


@torch.inference_mode()
def answer(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Any]:
    y = model(x)
    if y.is_cuda:
        torch.cuda.synchronize()
    return {"digest": digest(y[:, :16].flatten().tolist()), "sum": round(float(y.double().sum()), 6)}
