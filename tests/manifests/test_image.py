"""The Dockerfile builds, with no registry and no Docker daemon: buildah over a debootstrapped base.

No base image can be pulled here (only Debian's and PyPI's mirrors are reachable), so the test makes
`debian:trixie` itself with debootstrap, imports it into a private buildah store, builds the
Dockerfile on it (--isolation chroot, vfs storage: no daemon, no overlay mounts) and checks the
image: the entrypoint, the non-root user, the runtime and CRIU >= 4.2 in it. Several minutes: slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap and buildah's chroot isolation need root"),
    pytest.mark.skipif(
        not (shutil.which("buildah") and shutil.which("debootstrap")),
        reason="needs buildah and debootstrap from Debian (make tools installs them)",
    ),
]

BASE = "localhost/debian:trixie-thaw-test"
IMAGE = "localhost/thaw:test"


def _mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def _apt_skips_valid_until() -> bool:
    out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    return 'Acquire::Check-Valid-Until "false"' in out


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    store = tmp_path_factory.mktemp("buildah")
    cmd = [
        "buildah",
        "--root",
        str(store / "root"),
        "--runroot",
        str(store / "run"),
        "--storage-driver",
        "vfs",
    ]
    yield cmd
    subprocess.run([*cmd, "rm", "--all"], capture_output=True, check=False)
    subprocess.run([*cmd, "rmi", "--all", "--force"], capture_output=True, check=False)
    shutil.rmtree(store, ignore_errors=True)


def _run(cmd: list[str], timeout: int = 900) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd[:6])}... failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def image(buildah: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    rootfs = tmp_path_factory.mktemp("trixie")
    _run(["debootstrap", "--variant=minbase", "trixie", str(rootfs), _mirror()])
    ctr = _run([*buildah, "from", "scratch"]).strip()
    mnt = _run([*buildah, "mount", ctr]).strip()
    _run(["cp", "-a", f"{rootfs}/.", mnt])
    _run([*buildah, "umount", ctr])
    _run([*buildah, "commit", "-q", ctr, BASE])
    shutil.rmtree(rootfs, ignore_errors=True)
    args = [
        *buildah,
        "bud",
        "--isolation",
        "chroot",
        "--pull-never",
        "--build-arg",
        f"BASE={BASE}",
        "-t",
        IMAGE,
    ]
    if _apt_skips_valid_until():  # this machine's Debian mirror is a frozen snapshot
        args += ["--build-arg", "APT_SNAPSHOT_MIRROR=1"]
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).exists():  # a TLS-intercepting proxy's CA for pip, as the Dockerfile documents
        args += ["--secret", f"id=pip_cert,src={cert}"]
    _run([*args, str(REPO)], timeout=1800)
    return IMAGE


def test_image_config(buildah: list[str], image: str) -> None:
    import json

    cfg = json.loads(_run([*buildah, "inspect", "--type", "image", image]))["OCIv1"]["config"]
    assert cfg["Entrypoint"] == ["/opt/thaw/bin/thaw"]
    assert cfg["User"] == "65532:65532"
    assert "THAW_CRIU=/opt/thaw/bin/criu" in cfg["Env"]


def test_image_runs_the_runtime_and_criu(buildah: list[str], image: str) -> None:
    ctr = _run([*buildah, "from", "--pull-never", image]).strip()
    run = [*buildah, "run", "--isolation", "chroot", ctr, "--"]
    assert "webhook" in _run([*run, "/opt/thaw/bin/thaw", "--help"])
    version = _run([*run, "/opt/thaw/bin/criu", "--version"])
    m = re.search(r"Version:\s*(\d+)\.(\d+)", version)
    assert m and (int(m.group(1)), int(m.group(2))) >= (4, 2), version
    # What the thaw-tools init container does, then the copy runs from its new place.
    _run([*run, "cp", "-a", "/opt/thaw/.", "/tmp/thaw/"])
    assert "certs" in _run([*run, "/tmp/thaw/bin/thaw", "--help"])
