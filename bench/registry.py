"""``python -m bench registry``: publish and fetch throughput to a local OCI registry, beside the
directory store and the raw disk bandwidth (dd, direct I/O), in one run.

The registry is Debian's docker-registry (the CNCF distribution server) on loopback with TLS and
htpasswd auth, as tests/registry starts it; its storage, the directory store and the caches share one
filesystem, so every path pays the same disk. Publish = ingest into a node cache (hashed as copied)
then put from that copy (thaw.snapshot.ingest); fetch = list, verify the signature, stage into an
empty cache (every chunk checked). The page cache is dropped before each step where the machine
allows it (root), so each starts from disk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import not_run
from thaw.contract.signing import generate_keypair
from thaw.snapshot.fetch import fetch
from thaw.snapshot.store import Store, publish
from thaw.snapshot.stores import RegistryOptions, open_store

FACTS = {
    "arch": "x86_64", "kernel": "bench", "gpu": {"product": "bench", "count": 1}, "driver": "1",
    "criu": "4.2.1",
}  # fmt: skip


def _drop_caches() -> None:
    os.sync()
    # Not root, or a read-only /proc/sys: the numbers include the page cache (the table says so).
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _dd(root: Path, mib: int) -> tuple[float, float]:
    """(write, read) MB/s of one file with O_DIRECT: the disk itself."""
    f = root / "dd.bin"
    t = time.monotonic()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={f}", "bs=4M", f"count={mib // 4}", "oflag=direct", "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    w = mib * 1048576 / (time.monotonic() - t)
    _drop_caches()
    t = time.monotonic()
    subprocess.run(
        ["dd", f"if={f}", "of=/dev/null", "bs=4M", "iflag=direct"], check=True, capture_output=True
    )
    r = mib * 1048576 / (time.monotonic() - t)
    f.unlink()
    return w, r


def _timed(fn: Callable[[], object]) -> float:
    _drop_caches()
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def _round(store: Store, root: Path, tag: str, images: Path, keys: Path) -> tuple[float, float]:
    size = sum(p.stat().st_size for p in images.iterdir())
    pub = _timed(lambda: publish(store, "bench", "w1", images, keys / "signing.key", FACTS,  # type: ignore[arg-type]
                                 cache_dir=root / f"cache-pub-{tag}", namespace="bench"))  # fmt: skip
    plan: dict[str, object] = {}

    def do_fetch() -> None:
        plan.update(fetch(store, root / f"cache-{tag}", "bench", "w1", keys.parent / "trust", FACTS,  # type: ignore[arg-type]
                          namespace="bench", show_progress=False))  # fmt: skip

    got = _timed(do_fetch)
    if plan.get("action") != "restore":
        raise SystemExit(f"bench registry: {tag} fetch did not restore: {plan}")
    return size / pub, size / got


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench registry")
    ap.add_argument(
        "--mib", type=int, default=1024, help="snapshot size (MiB), one pages file plus a small one"
    )
    args = ap.parse_args(argv)
    from tests.registry.server import missing_tools, running_registry

    why = missing_tools()
    if why:
        return not_run("registry", why)
    root = Path(
        tempfile.mkdtemp(prefix="thaw-bench-registry-", dir=os.environ.get("THAW_BENCH_DIR", "/var/tmp"))
    )
    try:
        keys = root / "keys"
        generate_keypair(keys)
        trust = root / "trust"
        trust.mkdir()
        shutil.copy(keys / "signing.pub", trust / "signing.pub")
        images = root / "images"
        images.mkdir()
        with open(images / "pages-1.img", "wb") as f:
            for _ in range(args.mib // 4):
                f.write(os.urandom(4 * 1048576))
        (images / "core-1.img").write_bytes(os.urandom(64 * 1024))
        dd_w, dd_r = _dd(root, args.mib)
        d_pub, d_fetch = _round(open_store(root / "store"), root, "dir", images, keys)
        with running_registry(root / "registry") as reg:
            store = open_store(reg.store(), RegistryOptions(reg.auth_file(), reg.ca))
            r_pub, r_fetch = _round(store, root, "oci", images, keys)
        mb = 1e6
        print(f"snapshot {args.mib} MiB; page cache dropped before each step: {os.geteuid() == 0}")
        print(f"{'path':<34}{'publish MB/s':>14}{'fetch MB/s':>12}")
        print(f"{'raw disk (dd, O_DIRECT)':<34}{dd_w / mb:>14.0f}{dd_r / mb:>12.0f}   (write, read)")
        print(f"{'directory store':<34}{d_pub / mb:>14.0f}{d_fetch / mb:>12.0f}")
        print(f"{'registry (loopback, TLS, basic)':<34}{r_pub / mb:>14.0f}{r_fetch / mb:>12.0f}")
        print(
            f"registry fetch / directory fetch: {r_fetch / d_fetch:.2f}; "
            f"registry fetch / dd read: {r_fetch / dd_r:.2f}"
        )
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
