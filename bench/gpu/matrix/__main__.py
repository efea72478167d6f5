"""The compatibility matrix (issue 10.5), one command on the GPU machine (as root, ~7 min):

    python3 -m bench.gpu.matrix --out $OUT [--only KEY,...] [--device cpu --python PY --facts F]

For every pattern: a cold start in a fresh pod with ``thaw exec --checkpoint on-ready`` (the
runtime pods get: bench/gpu/bundle.py), ``thaw fetch`` into another node's cache, a restore in
another fresh pod, and the restored server's answer compared with the checkpointed server's; or the
checkpoint refused with its reason. Prints the table (driver, kernel, CRIU, torch, JAX versions) and
writes matrix.json, matrix.txt and matrix-pods.log under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.gpu import bundle, lifecycle
from bench.gpu.harness import REPO
from thaw.dev.sandbox import THAW_CAPS, with_caps

PORT = 8000
HF_PROMPT = {
    "prompt": [11, 42, 7, 99, 512, 3, 250, 31, 1000, 77, 5, 64, 901, 12, 8, 300],
    "max_new_tokens": 32,
}
# JAX's default preallocation takes 75% of the GPU (~105 GB of an H200); the CUDA checkpoint would copy
# that into host memory. Its pod runs under this memory limit, as a container with limits would, so a
# checkpoint that went ahead anyway could only end in that pod.
GUARD_LIMIT = 32 << 30


@dataclass(frozen=True)
class Pattern:
    key: str  # snapshot name and --only key
    label: str
    module: str  # bench.gpu.matrix.<module>, or "hf" for bench/gpu/hf_server.py
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    webhook_env: bool = True
    expect: str = "restore"  # or "refuse"
    fix: str = ""  # the documented fix where it is refused
    guard: bool = False  # run the pod under GUARD_LIMIT
    needs: str = "torch"  # or "jax"


PATTERNS = (
    Pattern("hf-compile", "transformers Qwen2, torch.compile defaults (webhook env)", "hf"),
    Pattern(
        "hf-compile-as-shipped",
        "transformers Qwen2, torch.compile defaults, no TORCHINDUCTOR_COMPILE_THREADS",
        "hf",
        webhook_env=False,
        expect="refuse",
        fix="TORCHINDUCTOR_COMPILE_THREADS=1 (the webhook's default)",
    ),
    Pattern("hf-eager", "transformers Qwen2, eager", "hf", ("--compile", "none")),
    Pattern("vllm-v1", "vLLM-V1-shaped: NVML front + CUDA engine, unix socket, /dev/shm", "vllm_v1"),
    Pattern("pinned", "pinned host memory (pin_memory, non_blocking copies)", "pinned"),
    Pattern(
        "expandable",
        "PyTorch expandable_segments (cuMem VMM)",
        "expandable",
        env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    ),
    Pattern(
        "cuda-ipc",
        "CUDA IPC between two processes (torch.multiprocessing)",
        "cuda_ipc",
        expect="refuse",
        fix="no CUDA IPC between the pod's processes on driver < 610 (NCCL: NCCL_P2P_DISABLE=1)",
    ),
    Pattern(
        "jax-no-prealloc",
        "JAX, XLA_PYTHON_CLIENT_PREALLOCATE=false",
        "jax_server",
        env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        # restored on an H200 with driver 580 it died with SIGSEGV once its GPU state was back
        # (results/h200-matrix-jax-rerun-2026-12-01.txt): thaw exec now refuses JAX before the lock
        expect="refuse",
        fix="thaw.dev/checkpoint: never (a restored JAX process dies on driver 580)",
        needs="jax",
    ),
    Pattern(
        "jax-default",
        "JAX as it ships (75% of the GPU preallocated)",
        "jax_server",
        expect="refuse",
        fix="thaw.dev/checkpoint: never (less preallocation lets the dump fit; a restored JAX process dies)",
        guard=True,
        needs="jax",
    ),
    Pattern(
        "vllm-v1-nvml-kept",
        "vLLM-V1-shaped, NVML left initialised in the front",
        "vllm_v1",
        env={"MATRIX_NVML_KEEP": "1"},
        expect="refuse",
        fix="nvmlShutdown after each query (vLLM does: with_nvml_context)",
    ),
)


def versions(python: str) -> dict[str, str]:
    code = (
        "import importlib, json\n"
        "out = {}\n"
        "for m in ('torch', 'transformers', 'jax'):\n"
        "    try:\n"
        "        out[m] = importlib.import_module(m).__version__\n"
        "    except Exception as exc:\n"
        "        out[m] = f'absent ({type(exc).__name__})'\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    try:
        value: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
        return value
    except (ValueError, IndexError):
        return {"error": r.stderr[-300:]}


def memory_guard(name: str, limit: int) -> list[str] | None:
    """argv prefix that moves the pod into a cgroup v2 with ``memory.max`` = ``limit``; None where
    that cannot be set up (no cgroup v2, no memory controller)."""
    base = Path("/sys/fs/cgroup")
    if (
        not (base / "cgroup.controllers").exists()
        or "memory" not in (base / "cgroup.controllers").read_text()
    ):
        return None
    try:
        if "memory" not in (base / "cgroup.subtree_control").read_text():
            (base / "cgroup.subtree_control").write_text("+memory")
        cg = base / f"thaw-matrix-{name}"
        cg.mkdir(exist_ok=True)
        (cg / "memory.max").write_text(str(limit))
        if (cg / "memory.swap.max").exists():
            (cg / "memory.swap.max").write_text("0")
    except OSError:
        return None
    return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]


def verdict(p: Pattern, life: dict[str, Any]) -> tuple[str, bool]:
    """What happened, and whether that is what the pattern should do (pure)."""
    ck = life.get("checkpoint") or {}
    info = (ck.get("outcome") or {}).get("checkpoint") or {}
    if ck.get("error"):
        return f"pod failed: {str(ck['error'])[-300:]}", False
    if info.get("status") != "published":
        served = ck.get("after_checkpoint") is not None
        stopped = " (workload stopped once, restarted cold)" if info.get("stopped_workload") else ""
        kept = "" if served or stopped else " (and the server did not answer after it)"
        why = lifecycle.short_reason(info.get("reason"), 600)
        text = f"checkpoint {info.get('status')}: {why}{stopped}{kept}"
        return text, p.expect == "refuse" and (served or bool(stopped))
    if life.get("stopped"):
        return str(life["stopped"]), False
    miss = life.get("miss") or {}
    out = miss.get("outcome") or {}
    if out.get("result") != "restored":
        return (
            f"restore failed, cold start: {lifecycle.short_reason(out.get('reason') or miss.get('error'))}",
            False,
        )
    key = "tokens" if p.module == "hf" else "out"
    ref = lifecycle.answer(ck, key, "after_checkpoint") or lifecycle.answer(ck, key)
    same = ref is not None and lifecycle.answer(miss, key) == ref
    again = lifecycle.answer(miss, key, "again") == ref
    if same and again:
        return "restored, identical output", p.expect == "restore"
    return f"restored, DIFFERENT output (first {same}, again {again})", False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated pattern keys")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--python", default="python3")
    ap.add_argument(
        "--dir", type=Path, default=Path(os.environ.get("THAW_BENCH_DIR", "/var/tmp/thawgpu")) / "matrix"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/thaw-out")))
    ap.add_argument("--budget-s", type=float, default=510.0, help="no pattern starts past this")
    ap.add_argument(
        "--limit-s", type=float, default=560.0, help="no pod runs past this (the command's limit)"
    )
    ap.add_argument("--facts", type=Path)
    args = ap.parse_args(argv)
    start = time.monotonic()
    lifecycle.fresh_suite_dir(args.dir)
    args.out.mkdir(parents=True, exist_ok=True)
    rt = bundle.resolve()
    from bench.gpu.hf import machine

    res: dict[str, Any] = {"suite": "matrix", **machine(args.python, rt), "versions": versions(args.python)}
    print(json.dumps(res), flush=True)
    only = {k for k in args.only.split(",") if k}
    chosen = [p for p in PATTERNS if not only or p.key in only]
    model = args.dir / "tiny-model"
    if any(p.module == "hf" for p in chosen):
        subprocess.run(
            [args.python, str(REPO / "bench/gpu/hf_server.py"), "--make-model", str(model), "--size", "tiny",
             "--device", args.device],
            check=True, capture_output=True,
        )  # fmt: skip
    s = lifecycle.Suite(
        root=args.dir, out=args.out, rt=rt, wrap=with_caps(THAW_CAPS), log=args.out / "matrix-pods.log",
        deadline=start + args.budget_s, facts=args.facts, hard_deadline=start + args.limit_s,
        save=lambda: lifecycle.save_json(args.out / "matrix.json", res),
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    res["rows"] = rows
    for p in chosen:
        row: dict[str, Any] = {"key": p.key, "pattern": p.label, "expect": p.expect, "fix": p.fix}
        rows.append(row)  # saved with what is done so far after every phase
        if s.left_s() < 45 or s.hard_left_s() < 150:
            row.update(verdict="skipped: time budget", ok=None)
            continue
        if p.needs == "jax" and not str(res["versions"].get("jax", "")).startswith(tuple("0123456789")):
            row.update(verdict="skipped: no jax here", ok=None)
            continue
        wrap: list[str] = []
        if p.guard:
            guard = memory_guard(p.key, GUARD_LIMIT)
            if guard is None:
                row.update(verdict="skipped: no memory cgroup to contain its checkpoint", ok=None)
                continue
            wrap = guard
        if p.module == "hf":
            cmd = [args.python, str(REPO / "bench/gpu/hf_server.py"), "--model", str(model),
                   "--port", str(PORT), "--device", args.device, *p.args]  # fmt: skip
            body: dict[str, Any] | None = HF_PROMPT
            path, key = "/generate", "tokens"
        else:
            cmd = [args.python, "-m", f"bench.gpu.matrix.{p.module}", str(PORT), *p.args]
            body, path, key = {}, "/answer", "out"
        w = lifecycle.Workload(
            name=p.key, cmd=cmd, port=PORT, body=body, path=path, env=dict(p.env), timeout=240,
            answer_key=key, webhook_env=p.webhook_env, wrap=wrap,
        )  # fmt: skip
        t = time.monotonic()
        life: dict[str, Any] = {}
        row["life"] = life
        lifecycle.life(s, w, res=life, tiers=(), with_cold=False)
        text, ok = verdict(p, life)
        ck = life.get("checkpoint") or {}
        miss = life.get("miss") or {}
        row.update(
            verdict=text,
            ok=ok,
            cold_first_answer_s=ck.get("first_answer_s"),
            restore_first_answer_s=miss.get("first_answer_s"),
            image_bytes=life.get("image_bytes"),
            checkpoint_timings={
                k: v
                for k, v in ((ck.get("outcome") or {}).get("checkpoint") or {}).items()
                if k.endswith("_s")
            },
            restore_timings=(miss.get("outcome") or {}).get("timings"),
            seconds=round(time.monotonic() - t, 1),
        )
        print(json.dumps({k: v for k, v in row.items() if k != "life"}), flush=True)
        s.saved()
    res["elapsed_s"] = round(time.monotonic() - start, 1)
    v = res["versions"]
    lines = [
        f"== compatibility matrix | {res['gpu']} | kernel {res['kernel']} | {res['criu']} "
        f"| torch {v.get('torch')} | transformers {v.get('transformers')} | jax {v.get('jax')} "
        f"| {res['runtime']['runtime']} | {res['date']}",
        f"{'pattern':70} {'as expected':>11}  result",
    ]
    for r in rows:
        exp = {True: "yes", False: "NO", None: "-"}[r.get("ok")]
        extra = ""
        if r.get("restore_first_answer_s") is not None and str(r["verdict"]).startswith("restored"):
            extra = (
                f" (cold pod {r.get('cold_first_answer_s')} s, restore {r['restore_first_answer_s']} s, "
                f"image {(r.get('image_bytes') or 0) / 1e9:.2f} GB)"
            )
        fix = (
            f" | fix: {r['fix']}"
            if r.get("fix") and r.get("ok") is not None and "restored" not in r["verdict"]
            else ""
        )
        lines.append(f"{r['pattern'][:70]:70} {exp:>11}  {r['verdict'][:400]}{extra}{fix}")
    lines.append(f"elapsed {res['elapsed_s']} s")
    text_out = "\n".join(lines)
    print(text_out, flush=True)
    lifecycle.save_json(args.out / "matrix.json", res)
    (args.out / "matrix.txt").write_text(text_out + "\n")
    if not os.environ.get("THAW_BENCH_KEEP"):  # the next suite needs the disk
        lifecycle.clear(args.dir)
    return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
