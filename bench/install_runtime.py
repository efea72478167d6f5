"""thaw-tools: how long a pod waits for the runtime, side by side in one run.

- ``cp -R`` (what thaw-tools ran before ``thaw install-runtime``): the whole bundle copied into each
  pod's emptyDir;
- ``thaw install-runtime``, the first pod on a node: the bundle copied once into the node's runtime
  directory (then flushed with syncfs and renamed), and linked;
- ``thaw install-runtime``, every later pod: a link to the node's copy.

Each run is a fresh process as root with every capability dropped (the init container's security
context), into a fresh emptyDir; the bundle is the one scripts/build-runtime makes (with CRIU, as
the image has it), or ``--bundle DIR``. With ``--cold`` the page cache is dropped before each run.
Goal: a later pod waits at least 10x less than ``cp -R``.

``python -m bench install_runtime`` or ``python -m bench.install_runtime [--bundle DIR] [--runs N] [--cold]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import not_run

REPO = Path(__file__).resolve().parents[1]
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
GOAL_SPEEDUP = 10.0


def _timed(argv: list[str], cold: bool) -> float:
    if cold:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    t = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return time.monotonic() - t


def _emptydir(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir()
    os.chmod(d, 0o777)  # as kubelet makes an emptyDir
    return d


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench.install_runtime")
    ap.add_argument("--bundle", type=Path, default=None, help="a built runtime (default: build one)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    args = ap.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return not_run("install_runtime", "needs root and setpriv")
    root = Path(tempfile.mkdtemp(prefix="thaw-bench-install-"))
    try:
        bundle = args.bundle
        if bundle is None:
            bundle = root / "opt-thaw"
            python = os.path.realpath(sys.executable)
            subprocess.run(
                [str(REPO / "scripts" / "build-runtime"), str(bundle), "--python", python], check=True
            )
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and not p.is_symlink())
        thaw = [str(bundle / "bin" / "thaw"), "install-runtime"]
        subprocess.run(["cat", *map(str, bundle.rglob("*.so*"))], capture_output=True, check=False)  # warm
        rows: dict[str, list[float]] = {
            "cp -R into the pod": [],
            "install-runtime, first pod": [],
            "install-runtime, later pods": [],
        }
        node = root / "node-shared"
        node.mkdir(mode=0o755)
        for i in range(args.runs):
            pod = _emptydir(root, f"cp{i}")
            rows["cp -R into the pod"].append(
                _timed([*NO_CAPS, "cp", "-R", f"{bundle}/.", f"{pod}/"], args.cold)
            )
            fresh = root / f"node{i}"
            fresh.mkdir(mode=0o755)
            pod = _emptydir(root, f"first{i}")
            argv_first = [*NO_CAPS, *thaw, "--runtime-dir", str(fresh), "--link", f"{pod}/rt"]
            rows["install-runtime, first pod"].append(_timed(argv_first, args.cold))
            shutil.rmtree(fresh)
        subprocess.run([*NO_CAPS, *thaw, "--runtime-dir", str(node), "--link", f"{root}/seed/rt"], check=True)
        for i in range(args.runs):
            pod = _emptydir(root, f"later{i}")
            argv_later = [*NO_CAPS, *thaw, "--runtime-dir", str(node), "--link", f"{pod}/rt"]
            rows["install-runtime, later pods"].append(_timed(argv_later, args.cold))
        cache = "cold page cache" if args.cold else "warm page cache"
        print(
            f"install_runtime: bundle {size / 1e6:.0f} MB, {args.runs} runs each, {cache}, "
            f"{os.cpu_count()} cores"
        )
        print(f"{'thaw-tools':30} {'median s':>9} {'min s':>7} {'max s':>7}")
        for name, times in rows.items():
            print(f"{name:30} {statistics.median(times):9.3f} {min(times):7.3f} {max(times):7.3f}")
        speedup = statistics.median(rows["cp -R into the pod"]) / statistics.median(
            rows["install-runtime, later pods"]
        )
        met = speedup >= GOAL_SPEEDUP
        print(
            f"later pods vs cp -R: {speedup:.1f}x faster "
            f"(goal {GOAL_SPEEDUP:.0f}x: {'met' if met else 'MISSED'})"
        )
        return 0 if met else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
