"""GPU benchmark: cold start versus restore through ``thaw fetch`` + ``thaw exec``, side by side in one
run, on one machine, with identical greedy outputs checked. Run on the GPU machine as root:

    python3 -m bench.gpu.side_by_side [--config bench|small] [--out DIR]   # thaw, CRIU: bench/gpu/bundle.py

Steps (each pod in fresh PID, mount and network namespaces, ``thaw exec`` as its PID 1):
1. weights: a random safetensors file for the config (written here, on this machine's disk);
2. cold: page cache dropped, empty torch.compile/Triton caches; time from ``thaw exec`` start to the
   first /generate answer;
3. checkpoint: the same cold start with ``--checkpoint on-ready``: thaw locks and checkpoints CUDA,
   dumps with CRIU leaving the server running, publishes (signed) to a store directory, keeps the
   node's copy; the server must answer identically afterwards;
4. fetch: ``thaw fetch`` into a second node cache (another node's), verified, writes the plan;
5. restore (disk): page cache dropped; ``thaw exec --plan``; time to the first answer;
6. restore (page cache): the same again with the image in page cache (the "memory" tier);
7. cold (warm compile cache), if time is left: what a cold start costs when only compilation is
   cached.
Prints a table; writes results.json and the pods' logs to --out.

``--tp N`` (issue 6): the server is bench/gpu/tp_server.py, N ranks (one process per GPU, NCCL)
under a launcher, with the NCCL settings of TP_NCCL_ENV; the checkpoint uses ``--tcp-established``
and the pods get NET_ADMIN besides. Step 7 is replaced by probes (``--probe``, time allowing): a
small TP model checkpointed and restored with one NCCL setting left out at a time, to find which
are needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gpu import bundle
from bench.gpu.harness import REPO, drop_caches, phase
from thaw.contract.nccl import NCCL_ENV
from thaw.dev.sandbox import THAW_CAPS, read_json, with_caps

# The NCCL settings of a checkpointable TP workload: the webhook's (thaw/contract/nccl.py).
TP_NCCL_ENV = dict(NCCL_ENV)
# Issue 6's known-good set, which the probes start from: the minimal set plus shared memory off.
ISSUE6_NCCL_ENV = {**TP_NCCL_ENV, "NCCL_SHM_DISABLE": "1"}
# What the probes leave out of ISSUE6_NCCL_ENV, one set at a time: nothing (the reference, which
# also checks the recorded GPU layout), each of SHM and cuMem, both, and P2P.
PROBES: tuple[tuple[str, ...], ...] = (
    (),
    ("NCCL_SHM_DISABLE",),
    ("NCCL_CUMEM_ENABLE",),
    ("NCCL_SHM_DISABLE", "NCCL_CUMEM_ENABLE"),
    ("NCCL_P2P_DISABLE",),
)
PROMPT = [11, 42, 7, 99, 512, 3, 250, 31, 1000, 77, 5, 64, 901, 12, 8, 300]
PORT = 8000


def sh(cmd: str) -> str:
    out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False)
    return (out.stdout + out.stderr).strip()


def pod_runtime() -> dict[str, Any]:
    """The harness spec's keys that run the bundle's thaw exec and CRIU in a pod."""
    rt = bundle.resolve()
    return {"thaw": list(rt.thaw), "runtime_env": rt.env()}


def checkpoint_args(
    store: Path, key: Path, name: str, workload: str, outcome: Path, *, tcp: bool
) -> list[str]:
    """``thaw exec`` flags of a checkpointing pod (signed publish to ``store``)."""
    return [
        "--checkpoint", "on-ready", "--ready", f"http://127.0.0.1:{PORT}/health", "--store", str(store),
        "--key", str(key), "--name", name, "--workload", workload, "--outcome", str(outcome),
        *(["--tcp-established"] if tcp else []),
    ]  # fmt: skip


def fetch(
    store: Path, cache: Path, name: str, workload: str, *, trust: Path, plan: Path
) -> subprocess.CompletedProcess[str]:
    """``thaw fetch`` into another node's ``cache``: the plan a restoring pod gets."""
    return bundle.resolve().cli(
        "fetch", "--store", str(store), "--cache", str(cache), "--name", name, "--workload", workload,
        "--trust", str(trust), "--plan", str(plan),
    )  # fmt: skip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="bench")
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("THAW_BENCH_DIR", "/var/tmp/thawgpu")))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/thaw-out")))
    ap.add_argument("--budget-s", type=float, default=520.0, help="skip optional steps past this")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (GPUs); 1: server.py")
    ap.add_argument("--probe", action="store_true", help="with --tp: probe which NCCL settings are needed")
    ap.add_argument("--probe-only", action="store_true", help="with --tp: only the probes (small model)")
    ap.add_argument(
        "--remap-probe", action="store_true", help="only restore a one-GPU snapshot onto another GPU (2 GPUs)"
    )
    ap.add_argument(
        "--sleep-probe", type=float, default=0.0, metavar="GB",
        help="only a small model with GB of KV-cache-like reservation, checkpointed awake and asleep",
    )  # fmt: skip
    args = ap.parse_args(argv)
    start = time.monotonic()
    root: Path = args.dir / args.config
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = args.config if args.tp == 1 else f"{args.config}-tp{args.tp}"
    res: dict[str, Any] = {
        "config": args.config,
        "date": time.strftime("%Y-%m-%d"),
        "gpu": sh("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"),
        "kernel": platform.release(),
        "criu": sh(f"{bundle.resolve().criu or 'criu'} --version | head -1"),
        "runtime": bundle.resolve().describe(),
        "disk": sh(f"df -hT {root} | tail -1"),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(res), flush=True)
    keys, trust = root / "keys", root / "trust"
    r = bundle.resolve().cli("keys", "generate", "--out", str(keys))
    assert r.returncode == 0, r.stderr
    trust.mkdir()
    shutil.copy(keys / "signing.pub", trust / "signing.pub")
    if args.remap_probe:
        wrap = with_caps(THAW_CAPS)
        res["remap"] = remap_probes(root, trust, keys, wrap, args.out / "remap-probes.log")
        (args.out / "remap-probes.json").write_text(json.dumps(res, indent=2))
        print_probes(res["remap"])
        return 0
    if args.sleep_probe:
        res["sleep"] = sleep_probes(
            root, trust, keys, with_caps(THAW_CAPS), args.out / "sleep-probes.log", pool_gb=args.sleep_probe
        )
        (args.out / "sleep-probes.json").write_text(json.dumps(res, indent=2))
        print_probes(res["sleep"])
        return 0
    if args.probe_only:
        wrap = with_caps((*THAW_CAPS, "net_admin"))
        res["nccl_env"], res["pod_caps"] = (
            ISSUE6_NCCL_ENV,
            "runtime defaults + CHECKPOINT_RESTORE, SYS_PTRACE, NET_ADMIN",
        )
        res["probes"] = probes(args, root, trust, keys, wrap, args.out / f"{tag}-probes.log", start)
        (args.out / f"{tag}-probes.json").write_text(json.dumps(res, indent=2))
        print_probes(res["probes"])
        return 0
    weights = root / "weights.safetensors"
    t = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/gpu/server.py"),
            "--weights",
            str(weights),
            "--config",
            args.config,
            "--make-weights",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    print(out.stdout.strip(), out.stderr.strip()[-2000:], flush=True)
    if out.returncode != 0:
        return 1
    res["weights_bytes"] = weights.stat().st_size
    res["weights_write_s"] = round(time.monotonic() - t, 2)
    cmd = [
        "python3",
        str(REPO / "bench/gpu/server.py"),
        "--weights",
        str(weights),
        "--config",
        args.config,
        "--port",
        str(PORT),
    ]
    tp_env: dict[str, str] = {}
    if args.tp > 1:
        cmd[1] = str(REPO / "bench/gpu/tp_server.py")
        cmd += ["--tp", str(args.tp), "--run-dir", str(root)]
        tp_env = dict(TP_NCCL_ENV)
        res["nccl_env"] = tp_env
    url = f"http://127.0.0.1:{PORT}/generate"
    body = {"prompt": PROMPT, "max_new_tokens": args.max_new}
    # every pod with a pod's capabilities, not full root; TCP repair for the ranks' connections
    wrap = with_caps((*THAW_CAPS, "net_admin") if args.tp > 1 else THAW_CAPS)
    res["pod_caps"] = "runtime defaults + CHECKPOINT_RESTORE, SYS_PTRACE" if wrap else "full root"
    common = {
        "url": url, "body": body, "cmd": cmd, "timeout": 420, "request_timeout": 60, "wrap": wrap,
        **pod_runtime(),
    }  # fmt: skip

    def cold_env(name: str) -> dict[str, str]:
        cc = root / f"compile-cache-{name}"
        return {
            **tp_env,
            "TORCHINDUCTOR_CACHE_DIR": str(cc / "inductor"),
            "TRITON_CACHE_DIR": str(cc / "triton"),
        }

    # 2. cold, empty compile cache, page cache dropped
    res["drop_caches"] = drop_caches()
    cold = phase(
        {
            **common,
            "name": "cold",
            "thaw_args": ["--outcome", str(root / "pod-cold/outcome.json")],
            "env": cold_env("cold"),
            "outcome": str(root / "pod-cold/outcome.json"),
            "log": str(args.out / f"{tag}-cold.log"),
        }
    )
    print(json.dumps(cold), flush=True)
    # 3. checkpoint (also a cold start)
    drop_caches()
    ck_outcome = root / "pod-ckpt/outcome.json"
    ck_spec: dict[str, Any] = {
        **common,
        "name": "checkpoint",
        "wait_checkpoint": True,
        "env": cold_env("ckpt"),
        "outcome": str(ck_outcome),
        "log": str(args.out / f"{tag}-checkpoint.log"),
        "thaw_args": [
            *checkpoint_args(
                root / "store", keys / "signing.key", "standin", f"bench-{tag}", ck_outcome, tcp=args.tp > 1
            ),
            "--cache",
            str(root / "cache-a"),
        ],
    }
    ckpt = phase(ck_spec)
    print(json.dumps(ckpt), flush=True)
    ck = ckpt.get("outcome", {}).get("checkpoint", {})
    # Retried as full root only where CRIU failed (a capability the pods lack); a CUDA failure would
    # fail the same way, and the retry's warm compile cache would flatter its time.
    if ck.get("status") != "published" and wrap and "criu" in str(ck.get("reason", "")).lower():
        print("checkpoint with pod capabilities failed; again as full root:", ck.get("reason"), flush=True)
        res["checkpoint_with_pod_caps"] = ckpt
        wrap = common["wrap"] = []
        res["pod_caps"] = "full root (pod capabilities failed)"
        ckpt = phase({**ck_spec, "wrap": []})
        ck = ckpt.get("outcome", {}).get("checkpoint", {})
    res.update(cold=cold, checkpoint=ckpt)
    if ck.get("status") != "published":
        print("checkpoint failed:", ck, flush=True)
        (args.out / f"{tag}-results.json").write_text(json.dumps(res, indent=2))
        return 1
    # 4. fetch into another node's cache
    plan = root / "pod-restore/plan.json"
    t = time.monotonic()
    r = fetch(root / "store", root / "cache-b", "standin", f"bench-{tag}", trust=trust, plan=plan)
    res["fetch_s"] = round(time.monotonic() - t, 2)
    res["fetch_log"] = r.stderr[-600:]
    print("fetch:", res["fetch_s"], "s", r.stderr[-300:], flush=True)
    restore_args = ["--plan", str(plan), "--ready", f"http://127.0.0.1:{PORT}/health"]
    # 5. restore from disk
    res["drop_caches_restore"] = drop_caches()
    rd = phase(
        {
            **common,
            "name": "restore-disk",
            "thaw_args": restore_args,
            "again": True,
            "outcome": str(plan.parent / "outcome.json"),
            "log": str(args.out / f"{tag}-restore.log"),
        }
    )
    print(json.dumps(rd), flush=True)
    # 6. restore from page cache
    rm = phase(
        {
            **common,
            "name": "restore-pagecache",
            "thaw_args": restore_args,
            "outcome": str(plan.parent / "outcome.json"),
            "log": str(args.out / f"{tag}-restore.log"),
        }
    )
    print(json.dumps(rm), flush=True)
    res.update(restore_disk=rd, restore_pagecache=rm)
    # 7. cold with a warm compile cache (the checkpoint pod's), if time is left
    if args.tp > 1 and args.probe:
        res["probes"] = probes(args, root, trust, keys, wrap, args.out / f"{tag}-probes.log", start)
    elif time.monotonic() - start < args.budget_s - 90:
        drop_caches()
        cw = phase(
            {
                **common,
                "name": "cold-warm-compile-cache",
                "env": cold_env("ckpt"),
                "thaw_args": ["--outcome", str(root / "pod-cold2/outcome.json")],
                "outcome": str(root / "pod-cold2/outcome.json"),
                "log": str(args.out / f"{tag}-cold2.log"),
            }
        )
        print(json.dumps(cw), flush=True)
        res["cold_warm_cache"] = cw
    (args.out / f"{tag}-results.json").write_text(json.dumps(res, indent=2))
    # --- table
    ref = (cold.get("first") or {}).get("tokens")
    rows = [
        ("cold (empty compile cache)", cold),
        ("cold + checkpoint pod", ckpt),
        ("restore, disk", rd),
        ("restore, page cache", rm),
    ] + ([("cold (warm compile cache)", res["cold_warm_cache"])] if "cold_warm_cache" in res else [])
    print(f"\n== {tag}: {res['gpu']} | kernel {res['kernel']} | {res['criu']} | {res['date']}")
    print(
        f"weights {res['weights_bytes'] / 1e9:.2f} GB; image {ck.get('bytes', 0) / 1e9:.2f} GB; "
        f"checkpoint: cuda {ck.get('cuda_checkpoint_s')} s, criu dump {ck.get('criu_dump_s')} s, "
        f"cuda restore {ck.get('cuda_restore_s')} s, publish {ck.get('publish_s')} s; "
        f"fetch {res['fetch_s']} s"
    )
    if args.tp > 1:
        print(
            f"TP={args.tp}, NCCL env {tp_env}; decode ms (32 tokens): cold "
            f"{(cold.get('first') or {}).get('ms')}, restored {(rd.get('again') or {}).get('ms')}"
        )
    print(f"{'run':32} {'first answer s':>14} {'criu s':>7} {'cuda s':>7} {'speedup':>8}  same tokens")
    base = cold.get("first_answer_s")
    for label, r_ in rows:
        tm = (r_.get("outcome") or {}).get("timings", {})
        fa = r_.get("first_answer_s")
        toks = (r_.get("first") or {}).get("tokens")
        sp = f"{base / fa:.1f}x" if base and fa else "-"
        print(
            f"{label:32} {fa!s:>14} {tm.get('criu_restore_s', '-')!s:>7} "
            f"{tm.get('cuda_restore_s', '-')!s:>7} {sp:>8}  {toks == ref and toks is not None}"
        )
    after = (ckpt.get("after_checkpoint") or {}).get("tokens")
    print(
        f"server answers identically after its checkpoint: {after == ref}; restored twice in a row: "
        f"{(rd.get('again') or {}).get('tokens') == ref}; "
        f"restore outcome: {rd.get('outcome', {}).get('result')}"
    )
    print_probes(res.get("probes", []))
    return 0


def print_probes(rows: list[dict[str, Any]]) -> None:
    for pr in rows:
        print(
            f"probe {pr['dropped']}: checkpoint {pr.get('checkpoint')}, restore {pr.get('restore')}, "
            f"same tokens {pr.get('same_tokens')}, decode ms {pr.get('decode_ms')}; "
            f"{pr.get('checkpoint_reason') or pr.get('restore_reason') or pr.get('skipped') or ''}"
        )
        if pr.get("image_bytes"):
            print(
                f"  image {pr['image_bytes'] / 1e9:.2f} GB; checkpoint {pr.get('checkpoint_timings')}; "
                f"restore first answer {pr.get('restore_first_answer_s')} s, "
                f"timings {pr.get('restore_timings')}"
            )
        if "gpu_layout" in pr:
            print(
                f"  recorded GPU layout: {json.dumps(pr['gpu_layout'])}; "
                f"restore timings {pr.get('restore_timings')}"
            )
        if "fewer_gpus" in pr:
            print(f"  pod with one GPU fewer: {pr['fewer_gpus']}")


def small_weights(root: Path) -> Path | str:
    """The small config's weights (written once), or the error text."""
    weights = root / "small.safetensors"
    if weights.exists():
        return weights
    mk = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu/server.py"), "--weights", str(weights), "--config", "small",
         "--make-weights"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    return weights if mk.returncode == 0 else mk.stderr[-500:]


def small_server(root: Path, *extra: str) -> list[str] | str:
    """The command of the small one-GPU stand-in (no compilation), or the error text."""
    weights = small_weights(root)
    if isinstance(weights, str):
        return weights
    return [
        "python3", str(REPO / "bench/gpu/server.py"), "--weights", str(weights), "--config", "small",
        "--port", str(PORT), "--compile", "none", *extra,
    ]  # fmt: skip


def probe_once(
    name: str,
    cmd: list[str],
    env: dict[str, str],
    d: Path,
    ctx: dict[str, Any],
    *,
    tcp_established: bool,
    ckpt_hide: list[str] | None = None,
    restore_hide: list[str] | None = None,
    ckpt_extra: tuple[str, ...] = (),
    drop_before_restore: bool = False,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Checkpoint ``cmd`` in one pod (seeing /dev without ``ckpt_hide``; more ``thaw exec`` flags in
    ``ckpt_extra``), fetch, restore in another (without ``restore_hide``; the page cache dropped
    first with ``drop_before_restore``). Returns the row and the restore phase's spec (None if no
    snapshot). ``ctx``: keys, trust, wrap, log."""
    d.mkdir(parents=True, exist_ok=True)
    common = {
        "url": f"http://127.0.0.1:{PORT}/generate",
        "body": {"prompt": PROMPT, "max_new_tokens": 8},
        "cmd": cmd,
        "timeout": 120,
        "request_timeout": 30,
        "wrap": ctx["wrap"],
        "log": str(ctx["log"]),
        "env": env,
        **pod_runtime(),
    }
    ck = phase(
        {
            **common,
            "name": f"probe-ckpt-{name}",
            "wait_checkpoint": True,
            "outcome": str(d / "a/outcome.json"),
            "hide_dev": ckpt_hide or [],
            "thaw_args": checkpoint_args(
                d / "store",
                ctx["keys"] / "signing.key",
                "probe",
                name,
                d / "a/outcome.json",
                tcp=tcp_established,
            )
            + list(ckpt_extra),
        }
    )
    c = ck.get("outcome", {}).get("checkpoint", {})
    row: dict[str, Any] = {
        "dropped": name,
        "env": env,
        "checkpoint": c.get("status"),
        "checkpoint_reason": c.get("reason"),
        "checkpoint_timings": {k: v for k, v in c.items() if k.endswith("_s") or k == "cuda_lock_attempts"},
        "image_bytes": c.get("bytes"),
    }
    if c.get("status") != "published":
        return row, None
    plan = d / "b/plan.json"
    fetch(d / "store", d / "cache", "probe", name, trust=ctx["trust"], plan=plan)
    restore = {
        **common,
        "name": f"probe-restore-{name}",
        "outcome": str(plan.parent / "outcome.json"),
        "hide_dev": restore_hide or [],
        "thaw_args": ["--plan", str(plan), "--ready", f"http://127.0.0.1:{PORT}/health"],
    }
    if drop_before_restore:
        drop_caches()
    rs = phase(restore)
    row["restore_first_answer_s"] = rs.get("first_answer_s")
    row["restore"] = rs.get("outcome", {}).get("result")
    row["restore_reason"] = rs.get("outcome", {}).get("reason")
    row["restore_timings"] = rs.get("outcome", {}).get("timings")
    ref = (ck.get("first") or {}).get("tokens")
    row["same_tokens"] = ref is not None and (rs.get("first") or {}).get("tokens") == ref
    row["decode_ms"] = [(ck.get("first") or {}).get("ms"), (rs.get("first") or {}).get("ms")]
    row["gpu_layout"] = read_json(Path(read_json(plan).get("path", "")) / "thaw-exec.json").get("gpu")
    return row, restore


def probes(  # noqa: PLR0917
    args: argparse.Namespace, root: Path, trust: Path, keys: Path, wrap: list[str], log: Path, start: float
) -> list[dict[str, Any]]:
    """A small TP model, checkpointed and restored with the whole NCCL set and then with settings
    left out (PROBES). The whole set's snapshot also shows the GPU layout it recorded, and is offered
    to a pod that sees one GPU fewer (its /dev as a device plugin would give it), which must refuse
    it before CRIU runs."""
    weights = small_weights(root)
    if isinstance(weights, str):
        return [{"dropped": "-", "error": weights}]
    ctx = {"keys": keys, "trust": trust, "wrap": wrap, "log": log}
    out: list[dict[str, Any]] = []
    for drops in PROBES:
        name = "+".join(drops) or "none"
        if time.monotonic() - start > args.budget_s - 60:
            out.append({"dropped": name, "skipped": "time budget"})
            continue
        d = root / f"probe-{name}"
        cmd = [
            "python3", str(REPO / "bench/gpu/tp_server.py"), "--weights", str(weights), "--config", "small",
            "--port", str(PORT), "--tp", str(args.tp), "--run-dir", str(d), "--compile", "none",
        ]  # fmt: skip
        env = {k: v for k, v in ISSUE6_NCCL_ENV.items() if k not in drops}
        row, restore = probe_once(name, cmd, env, d, ctx, tcp_established=True)
        if not drops and restore is not None:
            # a pod given one GPU fewer: refused before CRIU, the whole workload cold
            fewer = phase(
                {**restore, "name": "probe-fewer-gpus", "timeout": 60, "hide_dev": [f"nvidia{args.tp - 1}"]}
            )
            row["fewer_gpus"] = {k: fewer.get("outcome", {}).get(k) for k in ("result", "reason", "timings")}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def remap_probes(root: Path, trust: Path, keys: Path, wrap: list[str], log: Path) -> list[dict[str, Any]]:
    """A small one-GPU model checkpointed in a pod that sees only GPU 1 and restored in a pod that
    sees only GPU 0 (another UUID: thaw exec passes UUID pairs), and, as the control, restored on
    GPU 1 again (the same UUID: no pairs). Needs two GPUs."""
    cmd = small_server(root)
    if isinstance(cmd, str):
        return [{"dropped": "-", "error": cmd}]
    ctx = {"keys": keys, "trust": trust, "wrap": wrap, "log": log}
    out = []
    for name, restore_hide in (("same-gpu", ["nvidia0"]), ("other-gpu", ["nvidia1"])):
        row, _ = probe_once(
            name, cmd, {}, root / f"remap-{name}", ctx, tcp_established=False,
            ckpt_hide=["nvidia0"], restore_hide=restore_hide,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def sleep_probes(
    root: Path, trust: Path, keys: Path, wrap: list[str], log: Path, *, pool_gb: float
) -> list[dict[str, Any]]:
    """A small one-GPU model holding ``pool_gb`` of KV-cache-like reservation, checkpointed awake
    and then asleep (``--sleep /sleep?level=1 --wake /wake_up``, vLLM's endpoints: the reservation
    freed before the CUDA lock),
    each restored from disk (page cache dropped): what sleep mode saves in image and restore."""
    cmd = small_server(root, "--pool-gb", str(pool_gb))
    if isinstance(cmd, str):
        return [{"dropped": "-", "error": cmd}]
    ctx = {"keys": keys, "trust": trust, "wrap": wrap, "log": log}
    out = []
    for name, hooks in (("awake", ()), ("asleep", ("--sleep", "/sleep?level=1", "--wake", "/wake_up"))):
        row, _ = probe_once(
            name, cmd, {}, root / f"sleep-{name}", ctx, tcp_established=False, ckpt_extra=hooks,
            drop_before_restore=True,
        )  # fmt: skip
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
