"""CRIU restore of private anonymous memory: stock CRIU beside the fast-restore build
(scripts/criu/parallel-restore.patch: the restorer reads the pages with several readers), the same
image, in one run (issue 12, "A faster CRIU restore").

A Python process fills ``--mb`` MiB of private anonymous memory (``mmap``) with distinct pseudo-random
MiBs and records their SHA-256; stock CRIU dumps it once (images under ``--dir``, so in the page cache);
then each round restores the image with stock CRIU and with the fast build (``criu restore -d``,
timed from start to exit), asks the restored process for the SHA-256 of its memory and kills it. The
page cache is warm for every restore but the first, which is left out. Reported: seconds and GB/s
(pages image bytes / second) per binary (median over ``--rounds``), the readers the fast build used,
and whether every restore brought back the same memory.

Runs on the GPU machine from the runtime bundle, with the machine's own Python (stdlib only)::

    python3 -m bench.criu_restore --criu-stock BUNDLE/bin/criu --criu-fast BUNDLE/bin/criu-fast

Defaults: the checkout's .tools/criu and .tools/criu-fast (``make criu``). Root (or
CAP_CHECKPOINT_RESTORE + CAP_SYS_PTRACE) is needed, as for any CRIU run.

Beside them, the machine's own ceiling: ``preadv`` from the same pages file into fresh anonymous
memory with one thread and with as many as the fast build's readers, without CRIU.

Goals: every restore has the dumped memory, and the fast build restores at least ``GOAL_SPEEDUP``
times faster than stock where the machine's parallel read scales at least ``MACHINE_SCALING``x
(else the speed goal is not checked: ``bench.NOT_RUN``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import not_run

REPO = Path(__file__).resolve().parents[1]
STOCK = REPO / ".tools" / "criu" / "bin" / "criu"
FAST = REPO / ".tools" / "criu-fast" / "bin" / "criu"
GOAL_SPEEDUP = 1.3
MACHINE_SCALING = 1.5  # the goal is checked where parallel reads themselves scale this much
MIB = 1 << 20

# The process CRIU dumps: MB MiB of private anonymous memory, each MiB distinct; it writes the
# memory's SHA-256 to SUMFILE once filled, and again on every SIGUSR1 (after a restore). It exits by
# itself at UNTIL (wall-clock seconds, which go on across a restore): a run that is killed before it
# kills its restored copy leaves nothing behind for long.
FILLER = r"""
import hashlib, mmap, os, random, signal, sys, time
mb, sumfile, until = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
mem = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
rng = random.Random(12)
for i in range(mb):
    mem[i << 20:(i + 1) << 20] = rng.randbytes(1 << 20)
def report(*_):
    digest = hashlib.sha256(memoryview(mem)).hexdigest()
    with open(sumfile + ".tmp", "w") as f:
        f.write(digest)
    os.replace(sumfile + ".tmp", sumfile)
signal.signal(signal.SIGUSR1, report)
report()
while time.time() < until:
    time.sleep(min(60.0, max(0.0, until - time.time())))
"""

# CRIU's flags as thaw exec gives them (thaw/runtime/criu.py), for a process in its own session.
COMMON = ("--file-locks", "--manage-cgroups=ignore", "--tcp-close", "--skip-in-flight")
READERS = re.compile(r"Reading (\d+) bytes of pages with (\d+) readers")


class BenchError(RuntimeError):
    """A step failed; the message says which and CRIU's last log lines."""


def mode_flags() -> list[str]:
    """``--unprivileged`` without CAP_SYS_ADMIN (thaw/runtime/criu.py's rule, read here so the bench
    needs nothing but the standard library)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return [] if int(line.split()[1], 16) >> 21 & 1 else ["--unprivileged"]
    return []


def _log_tail(log: Path, lines: int = 8) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_file(path: Path, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.02)
    raise BenchError(f"no {what} within {timeout:.0f}s")


def become_subreaper() -> bool:
    """Restored processes (``criu restore -d``) are re-parented to us, so we reap them and their
    PIDs are free for the next restore whatever PID 1 does with orphans."""
    import ctypes

    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # not ours: PID 1 reaps it
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def pages_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.glob("pages-*.img"))


@dataclass(frozen=True)
class Dumped:
    images: Path
    digest: str  # SHA-256 of the filler's memory before the dump
    pages: int  # bytes of pages images


def dump(criu: str, mb: int, work: Path, timeout: float = 600.0, lifetime: float = 3600.0) -> Dumped:
    """Start the filler, wait until its memory is filled, dump it with ``criu`` (the process is gone
    afterwards, its PID free for the restores). The filler, and so each restored copy, exits by
    itself ``lifetime`` seconds from now if nothing killed it."""
    images = work / "images"
    images.mkdir(parents=True)
    sumfile = work / "sum"
    proc = subprocess.Popen(
        [sys.executable, "-c", FILLER, str(mb), str(sumfile), str(time.time() + lifetime)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own session: nothing outside the tree for CRIU to refuse
    )
    try:
        digest = _wait_file(sumfile, timeout, "memory filled")
        sumfile.unlink()
        cmd = [criu, "dump", "-t", str(proc.pid), "-D", str(images), "-o", "dump.log", "-v2", *COMMON]
        cmd += ["--network-lock", "skip", *mode_flags()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode != 0:
            raise BenchError(f"criu dump exited {res.returncode}: {_log_tail(images / 'dump.log')}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return Dumped(images, digest, pages_bytes(images))


@dataclass(frozen=True)
class Restored:
    seconds: float
    digest: str  # SHA-256 of the restored process's memory
    readers: int  # the fast build's readers (its log); 1 for stock
    layout: tuple[str, ...]  # its mappings as restored: smaps headers, VmFlags, Anonymous (KiB)


def restore(criu: str, dumped: Dumped, env: dict[str, str] | None = None, timeout: float = 600.0) -> Restored:
    """``criu restore -d`` of ``dumped``, timed; then the restored memory's SHA-256, and the process
    killed and gone."""
    pidfile = dumped.images / "restored.pid"
    sumfile = dumped.images.parent / "sum"
    pidfile.unlink(missing_ok=True)
    sumfile.unlink(missing_ok=True)
    cmd = [criu, "restore", "-D", str(dumped.images), "-o", "restore.log", "-v3", *COMMON]
    cmd += ["--restore-detached", "--pidfile", str(pidfile), *mode_flags()]
    t0 = time.monotonic()
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env={**os.environ, **(env or {})}
    )
    seconds = time.monotonic() - t0
    log = dumped.images / "restore.log"
    if res.returncode != 0:
        raise BenchError(f"criu restore ({criu}) exited {res.returncode}: {_log_tail(log)}")
    pid = int(pidfile.read_text().strip())
    try:
        layout = mappings(Path(f"/proc/{pid}/smaps").read_text())
        os.kill(pid, signal.SIGUSR1)
        digest = _wait_file(sumfile, timeout, "restored memory's SHA-256")
    finally:
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
    m = READERS.search(log.read_text(errors="replace"))
    return Restored(seconds, digest, int(m.group(2)) if m else 1, layout)


def mappings(smaps: str) -> tuple[str, ...]:
    """What a restore must bring back of each mapping (pure): its header line (range, permissions,
    offset, file), its VmFlags and its Anonymous size; not Rss, which counts file pages faulted in
    since."""
    keep = ("VmFlags:", "Anonymous:")
    out = []
    for line in smaps.splitlines():
        first = line.split(" ", 1)[0]
        if first in keep or ("-" in first and not first.endswith(":")):
            out.append(" ".join(line.split()))
    return tuple(out)


def fill_rate(path: Path, nbytes: int, readers: int) -> float:
    """GB/s of ``preadv`` from ``path`` into fresh private anonymous memory with ``readers`` threads:
    the kernel's side of a restore (page faults, zeroing, copies) without CRIU, so the ceiling this
    machine gives a parallel read right now (other load included)."""
    import mmap
    import threading

    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.open(path, os.O_RDONLY)
    share = -(-nbytes // readers // MIB) * MIB
    errors: list[BaseException] = []

    def read(i: int) -> None:
        off = i * share
        view = memoryview(mem)[off : min(nbytes, off + share)]
        try:
            while len(view):
                n = os.preadv(fd, [view], off)  # releases the GIL: the readers fault in parallel
                if n <= 0:
                    raise OSError(f"{path} ended at {off}")
                view, off = view[n:], off + n
        except BaseException as exc:  # re-raised by the caller
            errors.append(exc)
        finally:
            view.release()

    try:
        threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - t0
    finally:
        os.close(fd)
        mem.close()
    if errors:
        raise errors[0]
    return _gbps(nbytes, seconds)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.criu_restore", description=__doc__.split("\n\n")[0])
    ap.add_argument("--criu-stock", default=str(STOCK), help="stock CRIU (default: .tools/criu)")
    ap.add_argument("--criu-fast", default=str(FAST), help="fast-restore CRIU (default: .tools/criu-fast)")
    ap.add_argument("--mb", type=int, default=2048, help="MiB of private anonymous memory (default 2048)")
    ap.add_argument("--rounds", type=int, default=3, help="timed restores per binary (default 3)")
    ap.add_argument("--readers", type=int, default=0, help="CRIU_RESTORE_IO_WORKERS for the fast build")
    ap.add_argument("--dir", default=None, help="where the images go (default: a temporary directory)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    suite = "bench.criu_restore"
    for name, path in (("stock", args.criu_stock), ("fast", args.criu_fast)):
        if not os.access(path, os.X_OK):
            return not_run(suite, f"no {name} CRIU at {path} (make criu, or pass --criu-{name})")
    if os.geteuid() != 0:
        return not_run(suite, "needs root (CRIU)")
    become_subreaper()
    work = Path(tempfile.mkdtemp(prefix="criu-restore-", dir=args.dir))
    fast_env = {"CRIU_RESTORE_IO_WORKERS": str(args.readers)} if args.readers else {}
    try:
        dumped = dump(args.criu_stock, args.mb, work)
        restore(args.criu_stock, dumped)  # warms the page cache for both; not counted
        runs: dict[str, list[Restored]] = {"stock": [], "fast": []}
        for _ in range(args.rounds):
            runs["stock"].append(restore(args.criu_stock, dumped))
            runs["fast"].append(restore(args.criu_fast, dumped, fast_env))
        readers = max(r.readers for r in runs["fast"])
        biggest = max(dumped.images.glob("pages-*.img"), key=lambda p: p.stat().st_size)
        size = biggest.stat().st_size // MIB * MIB
        fill = {n: max(fill_rate(biggest, size, n) for _ in range(2)) for n in sorted({1, readers})}
    except (BenchError, OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"{suite}: failed: {exc}", flush=True)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(args, suite, dumped=dumped, runs=runs, fill=fill, readers=readers)


def report(
    args: argparse.Namespace,
    suite: str,
    *,
    dumped: Dumped,
    runs: dict[str, list[Restored]],
    fill: dict[int, float],
    readers: int,
) -> int:
    """Print the table and the verdict: 1 when a restore brought back other memory, or the fast
    build is under GOAL_SPEEDUP where the machine itself reads in parallel at least
    MACHINE_SCALING times faster than with one reader; NOT_RUN where it does not (a 1-CPU or busy
    machine: no goal can be checked)."""
    cpus = len(os.sched_getaffinity(0))
    gb = dumped.pages / 1e9
    result: dict[str, object] = {"pages_gb": round(gb, 3), "mib": args.mb, "cpus": cpus}
    print(f"CRIU restore of {args.mb} MiB of private anonymous memory ({gb:.2f} GB of pages), {cpus} CPUs")
    print(f"{'binary':8} {'median s':>9} {'GB/s':>7} {'readers':>8} {'runs (s)':<30} same memory")
    for kind, rs in runs.items():
        med = statistics.median(r.seconds for r in rs)
        same = all(r.digest == dumped.digest for r in rs)
        times = " ".join(f"{r.seconds:.2f}" for r in rs)
        print(f"{kind:8} {med:9.3f} {_gbps(dumped.pages, med):7.2f} {rs[0].readers:8d} {times:<30} {same}")
        result[kind] = {
            "median_s": round(med, 3),
            "gbps": round(_gbps(dumped.pages, med), 3),
            "readers": rs[0].readers,
            "runs_s": [round(r.seconds, 3) for r in rs],
            "same_memory": same,
        }
    speedup = statistics.median(r.seconds for r in runs["stock"]) / statistics.median(
        r.seconds for r in runs["fast"]
    )
    scaling = fill[readers] / fill[1]
    result |= {
        "speedup": round(speedup, 2),
        "fill_gbps": {str(n): round(v, 3) for n, v in fill.items()},
        "machine_scaling": round(scaling, 2),
    }
    fills = ", ".join(f"{n} reader{'s' if n > 1 else ''} {v:.2f} GB/s" for n, v in fill.items())
    print(f"the machine without CRIU (preadv into fresh memory, same file): {fills} ({scaling:.2f}x)")
    identical = all(r.digest == dumped.digest for rs in runs.values() for r in rs)
    print(f"fast / stock: {speedup:.2f}x (goal >= {GOAL_SPEEDUP}x); memory identical: {identical}")
    print("RESULT " + json.dumps(result, sort_keys=True), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if not identical:
        print(f"{suite}: a restore brought back other memory than was dumped")
        return 1
    if scaling < MACHINE_SCALING:
        return not_run(
            suite, f"this machine's parallel read scales {scaling:.2f}x now (< {MACHINE_SCALING}x)"
        )
    return 0 if speedup >= GOAL_SPEEDUP else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
