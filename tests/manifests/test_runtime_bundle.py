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


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
@pytest.mark.skipif(not BUSYBOX.exists(), reason="needs busybox-static for the chroot's /bin/sh (make tools)")
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
