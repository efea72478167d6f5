"""CPU cold start versus restore, side by side: a small stand-in server (3 s of warm-up work, 256 MiB
of state) started by ``thaw exec`` cold, then checkpointed by ``thaw exec --checkpoint on-ready``,
fetched by ``thaw fetch`` into another cache and restored by ``thaw exec --plan``, each pod in fresh
PID, mount and network namespaces. Twice, side by side: checkpointed awake, and asleep (``--sleep
/sleep --wake /wake_up``: the stand-in lets go of its 256 MiB, as vLLM's sleep mode drops its KV cache,
and every replica is woken before its readiness check). Needs root and CRIU (``make criu``); says so
and skips otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.gpu.harness import drop_caches, phase

PORT = 8290
WARMUP_S = "3"
MEM_MB = "256"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    try:
        from thaw.runtime.criu import find_criu

        find_criu()
    except Exception as exc:
        return str(exc)
    return None


def main(argv: list[str]) -> int:
    why = _why_not()
    if why:
        print(f"runtime_cpu: skipped ({why})")
        return 0
    from thaw.contract.signing import generate_keypair
    from thaw.dev.sandbox import STANDIN, write_facts

    root = Path(tempfile.mkdtemp(prefix="thaw-bench-cpu-"))
    try:
        keys, trust = root / "keys", root / "trust"
        generate_keypair(keys)
        trust.mkdir()
        shutil.copy(keys / "signing.pub", trust)
        write_facts(root / "facts.json")
        cmd = [
            "python3",
            str(STANDIN),
            str(PORT),
            "--warmup",
            WARMUP_S,
            "--mem-mb",
            MEM_MB,
        ]
        common: dict[str, Any] = {"url": f"http://127.0.0.1:{PORT}/state", "cmd": cmd, "timeout": 120}
        rows: list[tuple[str, dict[str, Any]]] = []
        drop_caches()
        rows.append(
            (
                "cold",
                phase(
                    {
                        **common,
                        "name": "cold",
                        "thaw_args": ["--outcome", str(root / "c/o.json")],
                        "outcome": str(root / "c/o.json"),
                        "log": str(root / "cold.log"),
                    }
                ),
            )
        )
        base = rows[0][1].get("first_answer_s")
        failed = 0
        for variant, hooks in (("awake", []), ("asleep", ["--sleep", "/sleep", "--wake", "/wake_up"])):
            result = _snapshot_and_restore(root, variant, hooks, common)
            if isinstance(result, str):
                print(f"runtime_cpu: {variant}: {result}")
                return 1
            failed += _report(variant, result, rows[0], base)
        return 1 if failed else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _snapshot_and_restore(
    top: Path, variant: str, hooks: list[str], common: dict[str, Any]
) -> dict[str, Any] | str:
    """Checkpoint (with ``hooks``: the server asleep), fetch into another cache, restore from disk
    and from page cache. The results, or why it stopped."""
    from thaw.dev.sandbox import thaw_cli

    root, keys, trust, facts = top / variant, top / "keys", top / "trust", top / "facts.json"
    root.mkdir()
    ck_out = root / "ck/o.json"
    ck = phase(
        {
            **common,
            "name": "checkpoint",
            "wait_checkpoint": True,
            "outcome": str(ck_out),
            "log": str(root / "ck.log"),
            "thaw_args": [
                "--checkpoint", "on-ready", "--ready", common["url"], *hooks,
                "--store", str(root / "store"), "--key", str(keys / "signing.key"), "--name", "cpu",
                "--workload", "w", "--facts", str(facts), "--cache", str(root / "cache-a"),
                "--outcome", str(ck_out),
            ],
        }
    )  # fmt: skip
    info = (ck.get("outcome") or {}).get("checkpoint", {})
    if info.get("status") != "published":
        return f"checkpoint failed: {info or ck}"
    plan = root / "r/plan.json"
    t = time.monotonic()
    res = thaw_cli(
        "fetch", "--store", str(root / "store"), "--cache", str(root / "cache-b"), "--name", "cpu",
        "--workload", "w", "--trust", str(trust), "--plan", str(plan), "--facts", str(facts),
    )  # fmt: skip
    fetch_s = time.monotonic() - t
    if res.returncode != 0:
        return f"fetch failed: {res.stderr}"
    restores: list[tuple[str, dict[str, Any]]] = []
    for label, drop in (("restore (disk)", True), ("restore (page cache)", False)):
        if drop:
            drop_caches()
        spec = {
            **common,
            "name": label,
            "thaw_args": ["--plan", str(plan), "--ready", common["url"]],
            "outcome": str(plan.parent / "outcome.json"),
            "log": str(root / "r.log"),
        }
        restores.append((label, phase(spec)))
    return {"checkpoint": ck, "info": info, "fetch_s": fetch_s, "restores": restores}


def _report(
    variant: str, result: dict[str, Any], cold: tuple[str, dict[str, Any]], base: float | None
) -> int:
    """Print one variant's rows beside the cold start; the number of failed restores."""
    info, ck = result["info"], result["checkpoint"]
    pause = sum(
        float(info.get(k, 0))
        for k in ("sleep_s", "cuda_checkpoint_s", "criu_dump_s", "cuda_restore_s", "wake_s")
    )
    steps = ", ".join(f"{k[:-2]} {info[k]}" for k in ("sleep_s", "criu_dump_s", "wake_s") if k in info)
    print(
        f"\n[{variant}] image {info.get('bytes', 0) / 1e6:.0f} MB; checkpoint pause {pause:.2f} s ({steps}); "
        f"publish {info.get('publish_s')} s; fetch {result['fetch_s']:.2f} s"
    )
    print(f"{'run':22} {'first answer s':>14} {'criu s':>7} {'wake s':>7} {'speedup':>8}  state")
    # The cold run is another process with its own random state; a restore must answer with the
    # state of the server that was checkpointed.
    ck_state = (ck.get("first") or {}).get("digest", "")[:12]
    print(f"{'(checkpointed server)':22} {'':>14} {'':>7} {'':>7} {'':>8}  {ck_state}")
    failed = 0
    rows = [cold, *result["restores"]]
    for label, r in rows:
        fa = r.get("first_answer_s")
        tm = (r.get("outcome") or {}).get("timings", {})
        state = (r.get("first") or {}).get("digest", "")[:12]
        sp = f"{base / fa:.1f}x" if base and fa else "-"
        print(
            f"{label:22} {fa!s:>14} {tm.get('criu_restore_s', '-')!s:>7} {tm.get('wake_s', '-')!s:>7} "
            f"{sp:>8}  {state}"
        )
        restore = label.startswith("restore")
        failed += int(
            fa is None
            or (restore and r["outcome"].get("result") != "restored")
            or (restore and state != ck_state)
        )
    summary = {lbl: r.get("first_answer_s") for lbl, r in rows}
    print(
        json.dumps(
            {
                "variant": variant,
                "image_bytes": info.get("bytes"),
                "pause_s": round(pause, 3),
                "rows": summary,
            }
        )
    )
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
