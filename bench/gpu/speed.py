"""GPU benchmark, the stand-in (bench/gpu/server.py: 4.3 B bf16, ``torch.compile`` reduce-overhead /
CUDA graphs): where restore time goes and which levers help, side by side in one run (issues 10.4,
12, 16.2), through the runtime pods get (the bundle) in fresh pods:

    python3 -m bench.gpu.speed --out $OUT        # on the GPU machine, as root (~7 min)

1. this machine's host-to-device rate from pageable and from pinned memory (bench/gpu/h2d.py): the
   CUDA restore copies from pageable memory;
2. the current path (stock CRIU): the server checkpointed awake; restored on a node that must
   fetch first (fetch included) and on nodes that hold it: disk, page cache, tmpfs (the memory
   tier), each beside the storage bound (image bytes / that tier's bandwidth, measured in this run
   on the image's files), with whether the server's health check answered before its GPU state was
   back; then each tier's hit again with the fast-restore CRIU;
3. the weights-out-of-the-image lever: the same server with ``--weights-vmm``, checkpointed asleep
   at level 2 (``--sleep /sleep?level=2``: no weights in the snapshot) and woken with vLLM's three
   steps (:data:`VLLM_LEVEL2_WAKE`: the weights' memory mapped back, the weights reloaded from the
   weights file into the same device addresses through pinned buffers, then the KV cache),
   restored the same ways, stock and fast CRIU (both levers: the new path);
4. the cold pod, last, while time is left (else the checkpoint pod's time to ready is the baseline).
Writes speed.json, speed.txt and speed-pods.log under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu import bundle, lifecycle
from bench.gpu.harness import REPO
from bench.gpu.hf import machine
from thaw.dev.sandbox import THAW_CAPS, with_caps

PORT = 8000
PROMPT = [11, 42, 7, 99, 512, 3, 250, 31, 1000, 77, 5, 64, 901, 12, 8, 300]
# vLLM's documented wake from sleep level 2 (docs/sleep-mode.md), as a thaw.dev/wake sequence.
VLLM_LEVEL2_WAKE = json.dumps(
    [
        "/wake_up?tags=weights",
        {"url": "/collective_rpc", "body": {"method": "reload_weights"}},
        "/wake_up?tags=kv_cache",
    ]
)


def h2d(python: str) -> dict[str, Any]:
    r = subprocess.run(
        [python, str(REPO / "bench/gpu/h2d.py"), "4"],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    try:
        value: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        return value
    except (ValueError, IndexError):
        return {"error": (r.stderr or r.stdout)[-400:]}


def cuda_rate(life: dict[str, Any], tier: str = "page cache") -> float | None:
    """GB/s of the CUDA restore in a hit (GPU bytes: the image less the host memory it also holds;
    an upper bound on what the driver copied)."""
    r = (life.get("hits") or {}).get(tier) or {}
    t = ((r.get("outcome") or {}).get("timings") or {}).get("cuda_restore_s")
    gpu = life.get("gpu_bytes")
    return round(gpu / t / 1e9, 2) if t and gpu else None


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench", choices=("bench", "small"))
    ap.add_argument("--python", default="python3")
    ap.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("THAW_BENCH_DIR", "/var/tmp/thawgpu")) / "speed"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/thaw-out")))
    ap.add_argument("--budget-s", type=float, default=560.0, help="optional steps are skipped past this")
    ap.add_argument(
        "--limit-s", type=float, default=560.0, help="no pod runs past this (the command's limit)"
    )
    ap.add_argument("--no-lever", action="store_true", help="only the current path")
    args = ap.parse_args(argv)
    start = time.monotonic()
    lifecycle.fresh_suite_dir(args.dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rt = bundle.resolve()
    res: dict[str, Any] = {"suite": "speed", "config": args.config, **machine(args.python, rt)}
    print(json.dumps(res), flush=True)
    weights = args.dir / "weights.safetensors"
    mk = subprocess.run(
        [args.python, str(REPO / "bench/gpu/server.py"), "--weights", str(weights), "--config", args.config,
         "--make-weights"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mk.returncode != 0:
        print(mk.stderr[-2000:], file=sys.stderr)
        return 1
    res["weights_bytes"] = weights.stat().st_size
    res["h2d"] = h2d(args.python)
    print("host to device:", json.dumps(res["h2d"]), flush=True)
    s = lifecycle.Suite(
        root=args.dir, out=args.out, rt=rt, wrap=with_caps(THAW_CAPS), log=args.out / "speed-pods.log",
        deadline=start + args.budget_s, hard_deadline=start + args.limit_s,
        save=lambda: lifecycle.save_json(args.out / "speed.json", res),
    )  # fmt: skip
    server = [args.python, str(REPO / "bench/gpu/server.py"), "--weights", str(weights),
              "--config", args.config, "--port", str(PORT)]  # fmt: skip
    body = {"prompt": PROMPT, "max_new_tokens": 32}
    # every life's base runs are the current path (stock CRIU); each tier's hit is run again on the
    # new path (the fast-restore CRIU) in the same run
    current = lifecycle.Workload(
        name="standin", cmd=server, port=PORT, body=body, env=lifecycle.CURRENT_PATH_ENV
    )
    res["current"] = {}
    lifecycle.life(s, current, res=res["current"], variants=lifecycle.NEW_PATH, with_cold=False)
    res["current"]["gpu_bytes"] = res["weights_bytes"]  # the weights dominate what the GPU holds
    lever = lifecycle.Workload(
        name="standin-l2",
        cmd=[*server, "--weights-vmm"],
        port=PORT,
        body=body,
        checkpoint_flags=["--sleep", "/sleep?level=2", "--wake", VLLM_LEVEL2_WAKE],
        env=lifecycle.CURRENT_PATH_ENV,
    )
    if not args.no_lever and s.hard_left_s() > 200:
        res["lever"] = {}
        lifecycle.life(
            s, lever, res=res["lever"], variants=lifecycle.NEW_PATH, with_cold=False,
            extra_read_bytes=res["weights_bytes"],
        )  # fmt: skip
    elif not args.no_lever:
        res["lever_skipped"] = f"{s.hard_left_s():.0f} s left"
    # The cold baseline last (the checkpoint pod's time to ready stands in when there is no time).
    if s.hard_left_s() > 150:
        res["current"]["cold"] = lifecycle.cold(s, current)
        s.saved()
    else:
        res["current"]["skipped"].append(f"cold ({s.hard_left_s():.0f} s left)")
    fast = lifecycle.NEW_PATH[0][0]
    texts = [lifecycle.table(res["current"]), *lifecycle.compare(res["current"], res["current"], fast)]
    if "lever" in res:
        res["lever"]["cold"] = res["current"].get("cold")  # the same server cold: one baseline
        texts.append(lifecycle.table(res["lever"]))
        texts += ["weights out of the image, against the current path:"]
        texts += lifecycle.compare(res["current"], res["lever"])
        texts += [
            "weights out of the image with the fast-restore CRIU (the new path), against the current path:"
        ]
        texts += lifecycle.compare(res["current"], res["lever"], fast)
    h = res["h2d"]
    rate = cuda_rate(res["current"])
    head = (
        f"== stand-in {args.config} ({res['weights_bytes'] / 1e9:.2f} GB weights) | {res['gpu']} | kernel "
        f"{res['kernel']} | {res['criu']} | torch {res['torch']} | {res['runtime']['runtime']} "
        f"| {res['date']}"
    )
    where = (
        f"CUDA restore (page cache hit): ~{rate} GB/s for the weights; this machine's host-to-device: "
        f"pageable {h.get('pageable_gb_s')} GB/s, pinned {h.get('pinned_gb_s')} GB/s"
    )
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    text = "\n".join([head, where, *texts, f"elapsed {res['elapsed_s']} s"])
    print(text, flush=True)
    lifecycle.save_json(args.out / "speed.json", res)
    (args.out / "speed.txt").write_text(text + "\n")
    if not os.environ.get("THAW_BENCH_KEEP"):  # the next suite needs the disk
        lifecycle.clear(args.dir)
    return 0 if res["current"].get("stopped") is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
