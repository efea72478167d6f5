"""What the NCCL settings of a checkpointable tensor-parallel pod cost in serving speed (issue 6):
all-reduce latency and bus bandwidth between the GPUs of this machine, under NCCL's defaults and
under each candidate set of settings, one after another in one run.

    python3 bench/gpu/nccl_cost.py [--tp 2] [--out DIR]

Sizes: 8 KiB is one decode step's activation of a 4,096-wide bf16 model at batch 1 (a TP decoder
all-reduces it twice per layer: the latency that bounds decode), 1 MiB a batch of 128, 64 MiB a
long prefill (bandwidth). Times are CUDA-event medians over many iterations after a warm-up. NVLink
multicast (NVLS) stays off in every set: the lent machines require it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo on the path
from thaw.contract.nccl import NCCL_ENV

SIZES = {"8KiB": 8 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}
BASE = {"NCCL_NVLS_ENABLE": "0", "NCCL_IB_DISABLE": "1", "TORCH_NCCL_ENABLE_MONITORING": "0"}
VARIANTS: dict[str, dict[str, str]] = {
    "nccl defaults (P2P over NVLink, SHM, cuMem)": {},
    "P2P off (not checkpointable: SHM + cuMem)": {"NCCL_P2P_DISABLE": "1"},
    "Thaw: P2P off, cuMem off (SHM on)": dict(NCCL_ENV),
    "issue 6 set: P2P off, SHM off, cuMem off": {**dict(NCCL_ENV), "NCCL_SHM_DISABLE": "1"},
}


def rank_main(rank: int, world: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out: dict[str, Any] = {}
    for label, nbytes in SIZES.items():
        t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        iters = 200 if nbytes < (8 << 20) else 30
        for _ in range(10):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dist.all_reduce(t)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000.0)  # µs
        med = statistics.median(times)
        # bus bandwidth as nccl-tests defines it: algbw * 2 (n - 1) / n
        busbw = nbytes / (med / 1e6) * 2 * (world - 1) / world / 1e9
        out[label] = {"median_us": round(med, 1), "busbw_GBps": round(busbw, 2)}
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(out), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_variant(tp: int, env_extra: dict[str, str]) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, **BASE, **env_extra, "NCCL_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(r), "--tp", str(tp), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(tp)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode for p in procs):
        return {"error": " | ".join(e[-400:] for _, e in outs)}
    value: dict[str, Any] = json.loads(outs[0][0].strip().splitlines()[-1])
    return value


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/thaw-out")))
    args = ap.parse_args(argv)
    if args.rank is not None:
        rank_main(args.rank, args.tp, args.port)
        return 0
    results = {}
    for name, extra in VARIANTS.items():
        results[name] = {"env": {**BASE, **extra}, **run_variant(args.tp, extra)}
        print(json.dumps({name: results[name]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"nccl-cost-tp{args.tp}.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'settings':46} " + " ".join(f"{k:>18}" for k in SIZES))
    for name, r in results.items():
        cells = [
            f"{r[k]['median_us']:>8} us {r[k]['busbw_GBps']:>5} GB/s" if k in r else f"{'error':>18}"
            for k in SIZES
        ]
        print(f"{name:46} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
