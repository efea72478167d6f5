"""CPU cold start versus restore, side by side: a small stand-in server (3 s of warm-up work, 256 MiB
of state) in fresh-container pods, through the same snapshot life as the GPU suites
(bench/gpu/lifecycle.py): checkpointed by ``thaw exec --checkpoint on-ready``; restored on a node
that must fetch it first (``thaw fetch`` timed, then the restore: the miss) and on nodes that hold it
(disk, page cache, tmpfs: hits), each beside the storage bound of what it reads; a cold pod. Twice:
checkpointed awake, and asleep (``--sleep /sleep --wake /wake_up``: the stand-in lets go of its 256
MiB, as vLLM's sleep mode drops its KV cache, and every replica is woken before its readiness
check). Thaw runs from the bundle when one is given (``THAW_RT``, or bench/gpu/bundle.py's
tarball), else from this checkout; the table says which. Needs root and CRIU (``make criu``); says
why and fails otherwise (a benchmark that did not run met no goal).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import not_run
from bench.gpu import bundle, lifecycle
from thaw.dev.sandbox import STANDIN, THAW_CAPS, missing_prerequisites, with_caps, write_facts

PORT = 8290
WARMUP_S = "3"
MEM_MB = "256"


def main(argv: list[str]) -> int:
    why = missing_prerequisites()
    if why:
        return not_run("runtime_cpu", why)

    root = Path(tempfile.mkdtemp(prefix="thaw-bench-cpu-"))
    try:
        facts = write_facts(root / "facts.json")
        rt = bundle.resolve()
        s = lifecycle.Suite(
            root=root, out=root, rt=rt, wrap=with_caps(THAW_CAPS), log=root / "pods.log",
            deadline=time.monotonic() + 3600, facts=facts,
        )  # fmt: skip
        cmd = ["python3", str(STANDIN), str(PORT), "--warmup", WARMUP_S, "--mem-mb", MEM_MB]
        print(f"runtime: {rt.describe()}")
        failed = 0
        cold: dict[str, object] | None = None
        for variant, hooks in (("awake", []), ("asleep", ["--sleep", "/sleep", "--wake", "/wake_up"])):
            w = lifecycle.Workload(
                name=f"cpu-{variant}", cmd=cmd, port=PORT, body=None, path="/state", ready_path="/state",
                checkpoint_flags=hooks, timeout=120, answer_key="digest",
            )  # fmt: skip
            life = lifecycle.life(s, w, with_cold=cold is None)
            if cold is None:
                cold = life.get("cold")
            else:
                life["cold"] = cold  # one cold baseline for both
            print()
            print(lifecycle.table(life, key="digest"))
            ok = lifecycle.all_restored(life, key="digest")
            failed += not ok
            rows = {r["run"]: r["first_answer_s"] for r in lifecycle.rows(life, key="digest")}
            print(
                json.dumps(
                    {"variant": variant, "image_bytes": life.get("image_bytes"), "rows": rows, "ok": ok}
                )
            )
        if failed:
            print(f"runtime_cpu: {failed} variant(s) did not restore with the checkpointed server's state")
            print(f"pods' log: {s.log}")
        return 1 if failed else 0
    finally:
        if not os.environ.get("THAW_BENCH_KEEP"):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
