"""GPU benchmark: an unmodified Hugging Face transformers model (bench/gpu/hf_server.py: Qwen2, ~3.4 B
parameters, ``torch.compile`` at default settings) cold versus restored in fresh pods, through the
runtime pods get (the bundle), in one run (issues 10.4, 10.5, 12, 16):

    python3 -m bench.gpu.hf --out $OUT                 # on the GPU machine, as root (~7 min)
    python3 -m bench.gpu.hf --size tiny --device cpu   # the same path on CPU (tests, this machine)

Rows (bench/gpu/lifecycle.py): cold; restored on a node that holds the snapshot, from tmpfs, page
cache and disk, each beside the storage bound of what it reads; restored on a node that must fetch
it first, fetch included. Every restore's tokens are compared with those of the server that was
checkpointed. Writes hf.json, hf.txt and hf-pods.log under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu import bundle, lifecycle
from bench.gpu.harness import REPO
from thaw.dev.sandbox import THAW_CAPS, with_caps

PORT = 8000
PROMPT = [11, 42, 7, 99, 512, 3, 250, 31, 1000, 77, 5, 64, 901, 12, 8, 300]
MAX_NEW = 32  # the server warms up on this shape (hf_server.WARMUP_*)


def sh(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (out.stdout.strip() or out.stderr.strip()).splitlines()[0] if (out.stdout or out.stderr) else ""


def machine(python: str, rt: bundle.Runtime) -> dict[str, Any]:
    """What a results table names: GPU and driver, kernel, CRIU, torch and transformers versions."""
    versions = sh(
        [python, "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"]
    ).split()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "kernel": platform.release(),
        "criu": sh([rt.criu, "--version"]) if rt.criu else "criu on PATH",
        "torch": versions[0] if versions else None,
        "transformers": versions[1] if len(versions) > 1 else None,
        "cpus": os.cpu_count(),
        "runtime": bundle.check(rt),
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="3b", choices=("3b", "tiny"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--python", default="python3", help="the workload's interpreter (torch, transformers)")
    ap.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("THAW_BENCH_DIR", "/var/tmp/thawgpu")) / "hf"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/thaw-out")))
    ap.add_argument("--budget-s", type=float, default=450.0, help="the cold pod is skipped past this")
    ap.add_argument(
        "--limit-s", type=float, default=560.0, help="no pod runs past this (the command's limit)"
    )
    ap.add_argument("--facts", type=Path, help="node facts file for every Thaw command (no GPU here)")
    ap.add_argument("--timeout", type=float, default=420.0, help="one pod's limit")
    ap.add_argument(
        "--tiers",
        default="disk,page cache,tmpfs",
        help="the hits to run (comma-separated: disk, page cache, tmpfs)",
    )
    args = ap.parse_args(argv)
    start = time.monotonic()
    lifecycle.fresh_suite_dir(args.dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rt = bundle.resolve()
    res: dict[str, Any] = {"suite": "hf", "size": args.size, **machine(args.python, rt)}
    print(json.dumps(res), flush=True)
    model = args.dir / "model"
    t = time.monotonic()
    mk = subprocess.run(
        [args.python, str(REPO / "bench/gpu/hf_server.py"), "--make-model", str(model), "--size", args.size,
         "--device", args.device],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    res["make_model"] = {"s": round(time.monotonic() - t, 1), "out": (mk.stdout + mk.stderr)[-800:]}
    print(mk.stdout.strip()[-300:], flush=True)
    if mk.returncode != 0:
        print(mk.stderr[-2000:], file=sys.stderr)
        return 1
    res["model_bytes"] = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    s = lifecycle.Suite(
        root=args.dir, out=args.out, rt=rt, wrap=with_caps(THAW_CAPS), log=args.out / "hf-pods.log",
        deadline=start + args.budget_s, facts=args.facts, hard_deadline=start + args.limit_s,
        save=lambda: lifecycle.save_json(args.out / "hf.json", res),
    )  # fmt: skip
    w = lifecycle.Workload(
        name="hf-qwen2",
        cmd=[args.python, str(REPO / "bench/gpu/hf_server.py"), "--model", str(model), "--port", str(PORT),
             "--device", args.device],
        port=PORT,
        body={"prompt": PROMPT, "max_new_tokens": MAX_NEW},
        env={"HF_HUB_OFFLINE": "1", **lifecycle.CURRENT_PATH_ENV},
        timeout=args.timeout,
    )  # fmt: skip
    res["life"] = {}
    # the default readiness gate (the tree stopped until its GPU state is back) beside the tree
    # running at once with only the ready file holding readiness (issue 10.4: both in one run), and
    # the new path beside the current one: each tier's hit again with the fast-restore CRIU
    lifecycle.life(
        s, w, res=res["life"], extra_restores=(("gate file", {"THAW_READY_GATE": "file"}),),
        variants=lifecycle.NEW_PATH, tiers=tuple(args.tiers.split(",")),
    )  # fmt: skip
    res["rows"] = lifecycle.rows(res["life"])
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    text = "\n".join(
        [
            f"== transformers Qwen2 {args.size} ({res['model_bytes'] / 1e9:.2f} GB of safetensors), "
            f"torch.compile defaults | "
            f"{res['gpu']} | kernel {res['kernel']} | {res['criu']} | torch {res['torch']} | "
            f"transformers {res['transformers']} | {res['runtime']['runtime']} | {res['date']}",
            lifecycle.table(res["life"]),
            *lifecycle.compare(res["life"], res["life"], lifecycle.NEW_PATH[0][0]),
            f"elapsed {res['elapsed_s']} s",
        ]
    )
    print(text, flush=True)
    lifecycle.save_json(args.out / "hf.json", res)
    (args.out / "hf.txt").write_text(text + "\n")
    if not os.environ.get("THAW_BENCH_KEEP"):  # the next suite needs the disk
        lifecycle.clear(args.dir)
    return 0 if lifecycle.all_restored(res["life"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
