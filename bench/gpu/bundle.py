"""The runtime that pods get (issue 16.1), for the benchmarks: Thaw's self-contained bundle
(scripts/build-runtime: its own Python, glibc loader and libraries, and CRIU 4.2.1 with its own
glibc), built on this machine and carried to the GPU machine as one compressed file, so the GPU
benchmark runs ``<bundle>/bin/thaw`` and ``<bundle>/bin/criu`` exactly as ``thaw-tools`` puts them in a
pod (``/thaw/rt``).

    python3 -m bench.gpu.bundle build   # here: .gpu/thaw-runtime.tar.xz (~39 MB)
    python3 -m bench.gpu.bundle check   # there: unpack; bin/thaw, bin/criu, libcuda from the bundled Python

Standard library only: it runs under the GPU machine's Python, which has none of Thaw's dependencies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thaw.dev.sandbox import thaw_cli, thaw_command

REPO = Path(__file__).resolve().parents[2]
# .gpu/ is ignored by git: carried to the device machine with run's carry, not committed.
TARBALL = REPO / ".gpu" / "thaw-runtime.tar.xz"
UNPACKED = Path(os.environ.get("THAW_BENCH_DIR", "/var/tmp/thawgpu")) / "thaw-rt"
TOP = "thaw-rt"  # the tarball's one top-level directory


@dataclass(frozen=True)
class Runtime:
    """How the benchmark's pods run Thaw: the bundle's CLI and CRIU, or (``kind`` "repository") this
    checkout's ``python -m thaw`` with ``THAW_CRIU`` as set."""

    kind: str  # "bundle" or "repository"
    thaw: tuple[str, ...]
    criu: str | None
    root: Path | None = None
    # Where the bundle's own loader cannot find the driver's libcuda.so.1 (it reads the loader cache
    # and the default directories, not LD_LIBRARY_PATH): THAW_LIBCUDA, named in every table.
    libcuda: str | None = None

    def env(self) -> dict[str, str]:
        """The pods' environment for CRIU (the webhook sets THAW_CRIU to the bundle's criu)."""
        out = {"THAW_CRIU": self.criu} if self.criu else {}
        if self.libcuda:
            out["THAW_LIBCUDA"] = self.libcuda
        return out

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """``thaw ARGS`` of this runtime, with its CRIU (the sandbox's one runner)."""
        return thaw_cli(*args, thaw=self.thaw, env=self.env(), timeout=timeout)

    def describe(self) -> str:
        if self.kind != "bundle":
            return f"repository ({' '.join(self.thaw)})"
        return f"bundle {self.root}" + (
            f" (THAW_LIBCUDA={self.libcuda}: not found by itself)" if self.libcuda else ""
        )


def bundle_runtime(root: Path) -> Runtime:
    return Runtime("bundle", (str(root / "bin" / "thaw"),), str(root / "bin" / "criu"), root)


def repository_runtime() -> Runtime:
    return Runtime("repository", tuple(thaw_command()), os.environ.get("THAW_CRIU"))


def build(tarball: Path = TARBALL, commit: str = "HEAD") -> Path:
    """scripts/build-runtime of ``commit`` (not the working tree, where other work may be half
    done) into a temporary directory, packed as ``tarball`` (xz); the commit is recorded in the
    bundle's SOURCE file."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="thaw-rt-build-") as tmp:
        src, dest = Path(tmp) / "src", Path(tmp) / TOP
        src.mkdir()
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", commit], capture_output=True, text=True, check=True
        ).stdout.strip()
        archive = subprocess.Popen(
            ["git", "-C", str(REPO), "archive", "--format=tar", rev], stdout=subprocess.PIPE
        )
        subprocess.run(["tar", "-x", "-C", str(src)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {rev} failed")
        subprocess.run([str(src / "scripts/build-runtime"), str(dest)], check=True)
        (dest / "SOURCE").write_text(f"{rev}\n")
        part = tarball.with_suffix(".part")
        if shutil.which("xz") and shutil.which("tar"):
            with open(part, "wb") as out:
                tar = subprocess.Popen(["tar", "-C", tmp, "-cf", "-", TOP], stdout=subprocess.PIPE)
                assert tar.stdout is not None
                subprocess.run(["xz", "-T0", "-6"], stdin=tar.stdout, stdout=out, check=True)
                tar.stdout.close()
                if tar.wait() != 0:
                    raise RuntimeError("tar failed")
        else:
            with tarfile.open(part, "w:xz", preset=6) as tf:
                tf.add(dest, arcname=TOP)
        part.replace(tarball)
    return tarball


def unpack(tarball: Path = TARBALL, dest: Path = UNPACKED) -> Path:
    """Unpack once per tarball (its size and mtime, recorded beside it); returns the bundle root."""
    stamp = dest / ".from"
    st = tarball.stat()
    mark = f"{tarball} {st.st_size} {int(st.st_mtime)}"
    root = dest / TOP
    if stamp.exists() and stamp.read_text() == mark and (root / "bin" / "thaw").exists():
        return root
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(tarball, "r:xz") as tf:
        if sys.version_info >= (3, 12):
            tf.extractall(dest, filter="tar")  # symlinks (bin/criu) and modes as built
        else:
            tf.extractall(dest)  # our own tarball
    stamp.write_text(mark)
    return root


@functools.cache
def resolve() -> Runtime:
    """``THAW_RT`` (a bundle directory), else the carried tarball (unpacked), else the repository."""
    explicit = os.environ.get("THAW_RT")
    if explicit:
        root = Path(explicit)
        if not (root / "bin" / "thaw").exists():
            raise SystemExit(f"THAW_RT={explicit} has no bin/thaw (build one: scripts/build-runtime DIR)")
    elif TARBALL.exists():
        root = unpack()
    else:
        return repository_runtime()
    return dataclasses.replace(bundle_runtime(root), libcuda=libcuda_fallback(root))


def host_library(name: str) -> str | None:
    """The path this process's loader resolves ``name`` to (LD_LIBRARY_PATH included), or None."""
    try:
        ctypes.CDLL(name)
    except OSError:
        return None
    stem = name.split(".so", 1)[0]
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split(None, 5)[-1].strip()
            if os.path.basename(path).startswith(stem + ".so"):
                return path
    return None


def libcuda_fallback(root: Path) -> str | None:
    """None when the bundle's Python loads libcuda.so.1 by itself (or there is none here at all);
    else the host's path to it, for THAW_LIBCUDA."""
    host = host_library("libcuda.so.1")
    if host is None:
        return None
    r = subprocess.run(
        bundled_python(root, CUDA_CHECK), capture_output=True, text=True, check=False, timeout=120
    )
    if r.returncode == 0 or "libcuda.so.1" not in r.stderr:
        return None
    return host


def bundled_python(root: Path, code: str, *args: str) -> list[str]:
    """argv running ``code`` with the bundle's Python and libraries, as bin/thaw runs the CLI."""
    python = sorted((root / "python" / "bin").glob("python3*"))[0]
    return [
        str(root / "lib" / "ld-linux-x86-64.so.2"), "--library-path", str(root / "lib"), str(python),
        "-I", "-S",
        "-c", f"import sys; sys.path.insert(0, {str(root / 'python' / 'site')!r}); {code}", *args,
    ]  # fmt: skip


# What thaw exec does with the driver, through the bundle's Python: load libcuda.so.1, read the
# GPUs' UUIDs. A pod whose bundle cannot do this checkpoints nothing.
CUDA_CHECK = (
    "from thaw.runtime.cuda import Cuda; import json; c = Cuda.load(); print(json.dumps(c.gpu_uuids()))"
)


def check(rt: Runtime) -> dict[str, Any]:
    """The runtime's CLI, CRIU and (with the bundle) its view of the driver, before any pod runs."""
    out: dict[str, Any] = {"runtime": rt.describe()}
    if rt.root is not None and (rt.root / "SOURCE").exists():
        out["commit"] = (rt.root / "SOURCE").read_text().strip()
    t = time.monotonic()
    r = subprocess.run([*rt.thaw, "--help"], capture_output=True, text=True, check=False, timeout=120)
    out["thaw_help"] = "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-300:]}"
    out["thaw_start_s"] = round(time.monotonic() - t, 3)
    if rt.criu:
        r = subprocess.run([rt.criu, "--version"], capture_output=True, text=True, check=False, timeout=60)
        out["criu"] = (r.stdout.strip().splitlines() or [r.stderr.strip()])[0]
    if rt.root is not None:
        r = subprocess.run(
            bundled_python(rt.root, CUDA_CHECK), capture_output=True, text=True, check=False, timeout=120,
            env={**os.environ, **rt.env()},
        )  # fmt: skip
        out["cuda"] = r.stdout.strip() if r.returncode == 0 else f"failed: {r.stderr.strip()[-400:]}"
    return out


def main(argv: list[str]) -> int:
    what = argv[0] if argv else "check"
    if what == "build":
        path = build()
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB")
        return 0
    if what == "check":
        print(json.dumps(check(resolve())))
        return 0
    print("usage: python3 -m bench.gpu.bundle build|check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
