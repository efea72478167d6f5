"""``python -m bench snapshot_io``: moving snapshot bytes at line rate (issue 12, "Fetch and publish
at line rate"; issue 11, the restore's verification), beside dd of the same file, in one run.

One snapshot of ``--size-mib`` (default 1536 MiB) in one image file plus small ones, on one
filesystem. Each step runs from the page cache ("warm") and with the source's pages dropped
(``posix_fadvise(DONTNEED)`` on that file alone: "cold"), best of ``--repeat``:

- dd: reading the file (``dd of=/dev/null bs=4M``: the source's bandwidth) and copying it onto the
  same filesystem (``dd bs=4M conv=fsync``: what any copy can reach when the destination is slower);
- ingest: a dump into the node cache, each byte read once, two sha256 streams (whole file, chunks),
  written, fsynced (thaw.snapshot.ingest.ingest);
- fetch: the store's copy into an empty cache, every 64 MiB chunk checked on every core
  (thaw.snapshot.cache.stage), and the same copy with ``copy_file_range`` then hashing what landed
  (kept only if it helps: this table is where that is decided);
- verify: the restore's re-hash (thaw.snapshot.cache.hold_verified) on 1 thread and on every core;
- publish: the whole of what the GPU benchmark's ``publish_s`` spans (thaw.runtime.publish.
  publish_and_record, as ``thaw exec --store --cache --key`` and thaw-sidecar run it): the dump into
  the node cache hashed as it is copied, signed, then into a directory store on the same filesystem
  (the GPU benchmark's layout), timed end to end. Its rate is the image's bytes over that time.
  Beside it, in the same run, the path before (the store's copy written again rather than shared),
  and a third case, "dirty": the dump just written and not yet on disk, as CRIU leaves it (dd's copy
  is measured that way too). Then the pod's layout: the store on another mount (a bind mount of a
  directory of the same filesystem, as the webhook mounts the cache and the store as two volumes:
  no link crosses them), written from the ingest's own read ("tee"), beside the path before (the
  cache's copy read back and written to the store), in the same interleaved run. On one disk both
  write the image twice; the tee saves the second read and its hashing.

Goal: fetch, ingest and publish at 80% or more of dd's copy of the same file, warm and cold (the
bound: a durable copy cannot beat the slower of reading the source and writing the destination, and
dd's copy measures that pair on the same bytes; dd's read, the source alone, is printed beside it).
CPU seconds are printed beside each rate: on a shared machine the wall rate says what was left over,
the CPU time what the work costs. ``--steps`` runs a subset (dd always runs: it is the bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from thaw.contract.facts import NodeFacts
from thaw.contract.manifest import Manifest
from thaw.contract.signing import generate_keypair
from thaw.runtime.publish import Target, publish_and_record
from thaw.snapshot.cache import hold_verified, stage
from thaw.snapshot.ingest import ingest
from thaw.snapshot.store import DirectoryStore
from thaw.snapshot.transfer import Progress, default_workers

FACTS: NodeFacts = {
    "arch": "x86_64", "kernel": "bench", "gpu": {"product": "none", "count": 0}, "driver": "none",
    "criu": "4.2.1",
}  # fmt: skip
GOAL = 0.8
STEPS = ("ingest", "fetch", "verify", "publish")


def _cpu() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def _drop(path: Path) -> None:
    """The file's pages out of the page cache (written back first), and nothing else's."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _warm(path: Path) -> None:
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"], check=True)


def _best(
    nbytes: int,
    repeat: int,
    prepare: Callable[[], None],
    run: Callable[[], object],
    after: Callable[[], None],
) -> tuple[float, float]:
    """(GB/s, CPU seconds) of the fastest of ``repeat`` runs."""
    return _best_each(nbytes, repeat, prepare, [run], after)[0]


def _best_each(
    nbytes: int,
    repeat: int,
    prepare: Callable[[], None],
    runs: list[Callable[[], object]],
    after: Callable[[], None],
) -> list[tuple[float, float]]:
    """(GB/s, CPU seconds) of the fastest of ``repeat`` runs of each of ``runs``, taken in turn
    (one of each, then again), so that what the disk was doing meanwhile falls on all of them."""
    best = [(0.0, 0.0) for _ in runs]
    for _ in range(repeat):
        for i, run in enumerate(runs):
            prepare()
            c, t = _cpu(), time.monotonic()
            run()
            wall, cpu = time.monotonic() - t, _cpu() - c
            after()
            if nbytes / wall / 1e9 > best[i][0]:
                best[i] = (nbytes / wall / 1e9, cpu)
    return best


def _cfr_copy(src: Path, dst: Path, chunk: int = 64 << 20) -> str:
    """copy_file_range into ``dst``, then hash what landed (the alternative the table weighs)."""
    h = hashlib.sha256()
    with open(src, "rb") as s, open(dst, "wb") as d:
        size = os.fstat(s.fileno()).st_size
        off = 0
        while off < size:
            n = os.copy_file_range(s.fileno(), d.fileno(), min(chunk, size - off), off, off)
            if n <= 0:
                break
            off += n
        d.flush()
        buf = bytearray(4 << 20)
        with open(dst, "rb") as r:
            while n := r.readinto(buf):
                h.update(memoryview(buf)[:n])
        os.fsync(d.fileno())
    return h.hexdigest()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench snapshot_io")
    ap.add_argument("--size-mib", type=int, default=1536)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go (default: a temp dir)")
    ap.add_argument(
        "--steps",
        default=",".join(STEPS),
        help=f"comma-separated subset of {','.join(STEPS)} (dd always runs)",
    )
    args = ap.parse_args(argv)
    steps = {x.strip() for x in args.steps.split(",") if x.strip()}
    if not steps <= set(STEPS):
        ap.error(f"--steps: unknown {sorted(steps - set(STEPS))}; allowed: {', '.join(STEPS)}")
    root = Path(tempfile.mkdtemp(prefix="thaw-bench-io-", dir=args.dir))
    workers = default_workers()
    rows: list[tuple[str, str, float, float, float | None]] = []
    try:
        dump = root / "dump"
        dump.mkdir()
        src = dump / "pages-1.img"
        with open(src, "wb") as f:
            for _ in range(args.size_mib // 64):
                f.write(os.urandom(64 << 20))
        for i in range(8):
            (dump / f"core-{i}.img").write_bytes(os.urandom(4096))
        n = sum(p.stat().st_size for p in dump.iterdir())
        ddcopy = root / "ddcopy"

        def dd_read() -> None:
            subprocess.run(["dd", f"if={src}", "of=/dev/null", "bs=4M", "status=none"], check=True)

        def dd_copy() -> None:
            subprocess.run(
                ["dd", f"if={src}", f"of={ddcopy}", "bs=4M", "conv=fsync", "status=none"], check=True
            )

        base: dict[str, float] = {}
        modes = (("warm", lambda: _warm(src)), ("cold", lambda: _drop(src)))
        # "dirty": the dump as CRIU leaves it for the publish (just written, not yet on disk), whose
        # writeback competes with the copies; dd and publish only.
        dirty = ("dirty", lambda: _rewrite(src)) if "publish" in steps else None
        for mode, prep in (*modes, *([dirty] if dirty else [])):
            if mode == "dirty":
                rate, cpu = _best(n, args.repeat, prep, dd_copy, ddcopy.unlink)
                rows.append(("dd copy, conv=fsync", mode, rate, cpu, None))
                base[f"copy-{mode}"], base[f"read-{mode}"] = rate, base["read-warm"]
                continue
            rate, cpu = _best(n, args.repeat, prep, dd_read, lambda: None)
            rows.append(("dd read (source bandwidth)", mode, rate, cpu, None))
            base[f"read-{mode}"] = rate
            rate, cpu = _best(n, args.repeat, prep, dd_copy, ddcopy.unlink)
            rows.append(("dd copy, conv=fsync", mode, rate, cpu, None))
            base[f"copy-{mode}"] = rate

        caches = root / "caches"
        if "publish" in steps:
            # First: the machine as the GPU benchmark's checkpoint pod finds it (nothing else written yet).
            private, _, _ = generate_keypair(root / "keys")
            shared = Target(
                store=DirectoryStore(root / "pubstore"), name="b", workload="w", namespace="b",
                key=private, facts=FACTS, cache=caches / "publish",
            )  # fmt: skip
            copied = dataclasses.replace(shared, store=_CopyingStore(root / "pubstore"))
            targets = [shared, copied]
            labels = ["publish (dump -> cache + store)", "  store copied, not shared (before)"]
            mnt = _bind_mount(root / "other-disk", root / "other-mount")
            if mnt is not None:
                teed = dataclasses.replace(shared, store=DirectoryStore(mnt / "pubstore"))
                targets += [teed, dataclasses.replace(shared, store=_NoTeeStore(mnt / "pubstore"))]
                labels += ["publish, store on another mount", "  store copied from the cache (before)"]
            for mode, prep in (*modes, *([dirty] if dirty else [])):
                each = _best_each(
                    n,
                    args.repeat,
                    prep,
                    [lambda t=t: _published(publish_and_record(dump, t)) for t in targets],  # type: ignore[misc]
                    lambda: _remove(caches / "publish", root / "pubstore", root / "other-disk" / "pubstore"),
                )
                for label, (rate, cpu) in zip(labels, each, strict=True):
                    rows.append((label, mode, rate, cpu, rate / base[f"copy-{mode}"]))
        if "ingest" in steps:
            for mode, prep in (("warm", lambda: _warm(src)), ("cold", lambda: _drop(src))):
                rate, cpu = _best(
                    n,
                    args.repeat,
                    prep,
                    lambda: ingest(
                        dump, caches / "ingest", namespace="b", name="b", workload="w", facts=FACTS, key=None
                    ),
                    lambda: shutil.rmtree(caches / "ingest"),
                )
                rows.append(("ingest (dump -> cache)", mode, rate, cpu, rate / base[f"copy-{mode}"]))
        if steps & {"fetch", "verify"}:
            _fetch_and_verify(dump, root, n, args.repeat, steps, base, rows)
    finally:
        if (root / "other-mount").is_dir():
            subprocess.run(["umount", "-l", str(root / "other-mount")], check=False)
        shutil.rmtree(root, ignore_errors=True)

    print(f"snapshot_io: {n / 1e9:.2f} GB, {workers} core(s), {os.uname().release}")
    print(f"{'step':32} {'cache':5} {'GB/s':>6} {'CPU s':>6} {'of dd copy':>10} {'of dd read':>10}")
    missed = []
    for step, mode, rate, cpu, ratio in rows:
        share = f"{ratio:.0%}" if ratio is not None else ""
        of_read = f"{rate / base[f'read-{mode}']:.0%}" if ratio is not None else ""
        print(f"{step:32} {mode:5} {rate:6.2f} {cpu:6.2f} {share:>10} {of_read:>10}")
        if ratio is not None and not step.startswith(" ") and ratio < GOAL:
            missed.append(f"{step} {mode} {ratio:.0%}")
    print(
        f"goal: fetch, ingest and publish at {GOAL:.0%} of dd's copy: "
        + ("met" if not missed else "missed: " + "; ".join(missed))
    )
    return 1 if missed else 0


class _CopyingStore(DirectoryStore):
    """The publish before sharing: the store's copy written again from the cache's, on the same disk."""

    def put(
        self,
        namespace: str,
        manifest: Manifest,
        snapshot_dir: Path,
        progress: Progress | None = None,
        *,
        share: bool = False,
    ) -> None:
        super().put(namespace, manifest, snapshot_dir, progress, share=False)


class _NoTeeStore(DirectoryStore):
    """The publish before the tee: a store on another mount got the cache's copy read back."""

    def tees_from(self, namespace: str, name: str, source: Path | None) -> bool:
        return False


def _bind_mount(disk: Path, mnt: Path) -> Path | None:
    """``disk`` seen at ``mnt`` through a bind mount (another mount of the same filesystem, as a
    pod's store volume is beside its cache volume); None, said on stdout, where mount is refused."""
    disk.mkdir()
    mnt.mkdir()
    r = subprocess.run(["mount", "--bind", str(disk), str(mnt)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        print(f"snapshot_io: no store on another mount (mount --bind: {r.stderr.strip()})")
        return None
    return mnt


def _rewrite(path: Path) -> None:
    """New bytes into ``path``, left dirty in the page cache (no fsync): as CRIU leaves a dump."""
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, size, 64 << 20):
            os.pwrite(fd, os.urandom(min(64 << 20, size - off)), off)
    finally:
        os.close(fd)


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            shutil.rmtree(p)


def _published(record: dict[str, object]) -> None:
    if record.get("status") != "published":
        raise RuntimeError(f"publish: {record}")


def _fetch_and_verify(  # noqa: PLR0917
    dump: Path,
    root: Path,
    n: int,
    repeat: int,
    steps: set[str],
    base: dict[str, float],
    rows: list[tuple[str, str, float, float, float | None]],
) -> None:
    caches, workers = root / "caches", default_workers()
    done = ingest(dump, caches / "pub", namespace="b", name="b", workload="w", facts=FACTS, key=None)
    store = DirectoryStore(root / "store")
    store.put("b", done.manifest, done.path)
    stored = store.snapshot_dir("b", "b", done.manifest["id"]) / "pages-1.img"
    for mode, prep in (("warm", lambda: _warm(stored)), ("cold", lambda: _drop(stored))):
        if "fetch" not in steps:
            break
        rate, cpu = _best(
            n,
            repeat,
            prep,
            lambda: stage(store, done.manifest, caches / "fetch", namespace="b"),
            lambda: shutil.rmtree(caches / "fetch"),
        )
        rows.append(("fetch (store -> cache)", mode, rate, cpu, rate / base[f"copy-{mode}"]))
        rate, cpu = _best(
            stored.stat().st_size,
            repeat,
            prep,
            lambda: _cfr_copy(stored, root / "cfr"),
            (root / "cfr").unlink,
        )
        rows.append(("  copy_file_range + hash", mode, rate, cpu, rate / base[f"copy-{mode}"]))
    if "verify" not in steps:
        return
    path = done.path
    for w in sorted({1, 2, 4, workers} & set(range(1, workers + 1))):
        rate, cpu = _best(
            n,
            repeat,
            lambda: _warm(path / "pages-1.img"),
            lambda w=w: _hold(path, done.manifest["id"], w),  # type: ignore[misc]
            lambda: None,
        )
        rows.append((f"verify, {w} thread(s)", "warm", rate, cpu, None))
    rate, cpu = _best(
        n,
        repeat,
        lambda: _drop(path / "pages-1.img"),
        lambda: _hold(path, done.manifest["id"], workers),
        lambda: None,
    )
    rows.append((f"verify, {workers} thread(s)", "cold", rate, cpu, None))


def _hold(path: Path, snapshot_id: str, workers: int) -> None:
    with hold_verified(path, snapshot_id, time.monotonic() + 10, workers=workers):
        pass


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
