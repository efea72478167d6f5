"""scripts/build-runtime: the runtime the image carries at /opt/thaw runs with nothing of the host.

Built from this machine's Python, copied to /thaw as the thaw-tools init container does, and run
in a chroot that holds only it and a static /bin/sh: no system Python, no glibc outside the bundle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.needs import require, requires, root

pytestmark = pytest.mark.slow

BUSYBOX = Path("/bin/busybox")
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("runtime") / "opt-thaw"
    python = os.path.realpath(sys.executable)
    out = subprocess.run(
        [str(REPO / "scripts" / "build-runtime"), str(dest), "--python", python, "--no-criu"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return dest


def test_runtime_ignores_the_callers_python_environment(runtime: Path, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "nothing"), "PYTHONHOME": "/nonexistent"}
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "thaw.py").write_text("raise SystemExit('the workload PYTHONPATH leaked in')\n")
    out = subprocess.run(
        [str(runtime / "bin" / "thaw"), "--help"], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "webhook" in out.stdout and "exec" in out.stdout
    # The demo, the tests' pod sandbox and the stand-in (thaw/dev) stay out of workload pods.
    site = runtime / "python" / "site" / "thaw"
    assert (site / "runtime" / "execute.py").is_file() and not (site / "dev").exists()


@requires(root("chroot"))
@requires(None if BUSYBOX.exists() else "needs busybox-static for the chroot's /bin/sh (make tools)")
def test_runtime_runs_in_an_empty_root(runtime: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "tmp").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for tool in ("sh", "cp"):
        (root / "bin" / tool).symlink_to("busybox")
    shutil.copytree(runtime, root / "opt" / "thaw", symlinks=True)
    env = {"PATH": "/bin"}
    # What thaw-tools does (webhook config tools.command), then the CLI from the copy.
    cp = subprocess.run([CHROOT, str(root), "/bin/cp", "-a", "/opt/thaw/.", "/thaw/"], env=env, check=False)
    assert cp.returncode == 0
    out = subprocess.run(
        [
            CHROOT,
            str(root),
            "/thaw/bin/thaw",
            "certs",
            "--out",
            "/tmp/c",
            "--dns",
            "thaw-webhook.thaw-system.svc",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (root / "tmp" / "c").iterdir()} >= {"ca.crt", "tls.crt", "tls.key"}
    assert not (root / "usr").exists() and not (root / "lib").exists(), "nothing of the host was needed"


# A stand-in for the driver's library: the five checkpoint symbols and a cuInit that succeeds.
FAKE_LIBCUDA = """
int cuInit(unsigned flags) { (void)flags; return 0; }
int cuGetErrorName(int code, const char **name) { (void)code; *name = "CUDA_ERROR_FAKE"; return 0; }
int cuCheckpointProcessLock(int pid, void *args) { (void)pid; (void)args; return 1; }
int cuCheckpointProcessCheckpoint(int pid, void *args) { (void)pid; (void)args; return 1; }
int cuCheckpointProcessRestore(int pid, void *args) { (void)pid; (void)args; return 1; }
int cuCheckpointProcessUnlock(int pid, void *args) { (void)pid; (void)args; return 1; }
int cuCheckpointProcessGetState(int pid, int *state) { (void)pid; (void)state; return 1; }
"""


def _cuda_line(runtime: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        [str(runtime / "bin" / "thaw"), "check", "node", "--cache", "/nonexistent", "--criu", "/bin/true"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if "CUDA checkpoint API" in ln]
    assert lines, out.stdout + out.stderr
    return lines[0]


def test_runtime_finds_libcuda_through_the_callers_ld_library_path(runtime: Path, tmp_path: Path) -> None:
    """NVIDIA's CUDA base images find libcuda.so.1 only through LD_LIBRARY_PATH
    (/usr/local/nvidia/lib64): the bundle's loader must search it after the bundle's own lib, whose
    libraries still win over the caller's (broken copies of them come first there)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    require(None if cc else "needs a C compiler for the stand-in libcuda.so.1 (make tools)")
    assert cc is not None
    driver = tmp_path / "nvidia-lib64"
    driver.mkdir()
    (tmp_path / "fake_cuda.c").write_text(FAKE_LIBCUDA)
    build = [cc, "-shared", "-fPIC", "-o", str(driver / "libcuda.so.1"), str(tmp_path / "fake_cuda.c")]
    subprocess.run(build, check=True, capture_output=True)
    for lib in (runtime / "lib").iterdir():
        # Broken copies would break the CLI if searched first; libc stays valid: the wrapper itself
        # is the image's /bin/sh, which the caller's LD_LIBRARY_PATH rightly serves.
        if not lib.name.startswith(("ld-linux", "libc.so")):
            (driver / lib.name).write_bytes(b"not a library\n")
    base = {"PATH": "/usr/bin:/bin"}
    assert "cannot load libcuda.so.1" in _cuda_line(runtime, base)
    found = _cuda_line(runtime, {**base, "LD_LIBRARY_PATH": f"{driver}:/nonexistent"})
    assert "cuInit ok" in found, found
