"""Images built once per test session, with no registry and no Docker daemon.

No base image can be pulled here (only Debian's and PyPI's mirrors are reachable), so ``debian_base``
makes ``debian:trixie`` itself with debootstrap and imports it into a private buildah store (vfs
storage, chroot isolation: no daemon, no overlay mounts). On it:

- ``thaw_image``: the repository's Dockerfile, built as a user would (tests/manifests/test_image.py
  checks it; tests/e2e runs it as the runtime that pods get);
- ``build_workload_image``: the same base plus Debian packages (python3) and one program (with the
  files it needs beside it), a workload image for real pods (tests/e2e).

``export_image`` writes an image as a docker-archive, the form ``ctr images import`` takes. The
fixtures are registered for the whole suite in tests/conftest.py, so CI builds each image once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import needs

REPO = Path(__file__).resolve().parent.parent
BASE = "localhost/debian:trixie-thaw-test"
THAW_IMAGE = "localhost/thaw:test"
# Where a workload image keeps its program (``build_workload_image``).
APP_DIR = "/app"
# The one rule for a test that cannot run here (tests/needs.py); tests/e2e imports it from here.
require = needs.require


def missing_image_tools() -> str | None:
    """Why images cannot be built here, or None."""
    if os.geteuid() != 0:
        return "debootstrap and buildah's chroot isolation need root"
    if not (shutil.which("buildah") and shutil.which("debootstrap")):
        return "needs buildah and debootstrap from Debian (make tools installs them)"
    return None


def run(cmd: Sequence[str], timeout: float = 900, what: str | None = None) -> str:
    """stdout of ``cmd``; a failure fails the test with the command and the tail of its output."""
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what or ' '.join(cmd[:6])} did not finish within {timeout:.0f} s: {exc}")
    if out.returncode != 0:
        pytest.fail(
            f"{what or ' '.join(cmd[:6]) + '...'} failed (exit {out.returncode}):\n"
            f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out.stdout


def debian_mirror() -> str:
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        m = re.search(r"^URIs:\s*(\S+)", sources.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def apt_skips_valid_until() -> bool:
    """This machine's Debian mirror is a frozen snapshot whose Release files have expired."""
    out = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, check=False).stdout
    return 'Acquire::Check-Valid-Until "false"' in out


@dataclass(frozen=True, slots=True)
class Buildah:
    """A private buildah store: ``cmd`` is buildah with its flags, to which a subcommand is appended."""

    cmd: tuple[str, ...]

    def __call__(self, *args: str, timeout: float = 900) -> str:
        return run([*self.cmd, *args], timeout=timeout)


@pytest.fixture(scope="session")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    require(missing_image_tools())
    store = tmp_path_factory.mktemp("buildah")
    b = Buildah(
        ("buildah", "--root", str(store / "root"), "--runroot", str(store / "run"), "--storage-driver", "vfs")
    )
    yield b
    subprocess.run([*b.cmd, "rm", "--all"], capture_output=True, check=False)
    subprocess.run([*b.cmd, "rmi", "--all", "--force"], capture_output=True, check=False)
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_base(buildah: Buildah, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``debian:trixie`` (minbase) made with debootstrap, in the buildah store as ``BASE``."""
    rootfs = tmp_path_factory.mktemp("trixie")
    run(["debootstrap", "--variant=minbase", "trixie", str(rootfs), debian_mirror()], what="debootstrap")
    ctr = buildah("from", "scratch").strip()
    mnt = buildah("mount", ctr).strip()
    run(["cp", "-a", f"{rootfs}/.", mnt])
    buildah("umount", ctr)
    buildah("commit", "-q", ctr, BASE)
    buildah("rm", ctr)
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE


@pytest.fixture(scope="session")
def thaw_image(buildah: Buildah, debian_base: str) -> str:
    """The repository's Dockerfile built on ``debian_base``, as ``THAW_IMAGE``."""
    args = [
        "bud",
        "--isolation",
        "chroot",
        "--pull-never",
        "--build-arg",
        f"BASE={debian_base}",
        "-t",
        THAW_IMAGE,
    ]
    if apt_skips_valid_until():
        args += ["--build-arg", "APT_SNAPSHOT_MIRROR=1"]
    cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    if Path(cert).exists():  # a TLS-intercepting proxy's CA for pip, as the Dockerfile documents
        args += ["--secret", f"id=pip_cert,src={cert}"]
    buildah(*args, str(REPO), timeout=1800)
    return THAW_IMAGE


def build_workload_image(
    buildah: Buildah,
    base: str,
    ref: str,
    program: Path,
    *,
    packages: Sequence[str] = ("python3",),
    files: Sequence[Path] = (),
) -> str:
    """``base`` plus Debian ``packages`` and ``program`` (and ``files`` beside it) at ``APP_DIR``,
    committed as ``ref``.

    The image runs as root (Kubernetes grants a container's added capabilities only to root) and
    has no entrypoint: the pod names its command, as Thaw pods must.
    """
    ctr = buildah("from", "--pull-never", base).strip()
    try:
        setup = ""
        if apt_skips_valid_until():
            setup = "printf 'Acquire::Check-Valid-Until \"false\";\\n' >/etc/apt/apt.conf.d/99snapshot && "
        install = (
            f"{setup}apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
            f"--no-install-recommends {' '.join(packages)} && rm -rf /var/lib/apt/lists/* "
            "/etc/apt/apt.conf.d/99snapshot"
        )
        buildah("run", "--isolation", "chroot", ctr, "--", "sh", "-c", install, timeout=900)
        buildah("run", "--isolation", "chroot", ctr, "--", "mkdir", "-p", APP_DIR)
        for path in (program, *files):
            buildah("copy", ctr, str(path), f"{APP_DIR}/{path.name}")
        buildah("config", "--user", "0:0", "--workingdir", APP_DIR, ctr)
        buildah("commit", "-q", ctr, ref)
    finally:
        subprocess.run([*buildah.cmd, "rm", ctr], capture_output=True, check=False)
    return ref


def export_image(buildah: Buildah, image: str, archive: Path, name: str) -> Path:
    """``image`` as a docker-archive at ``archive``, tagged ``name`` (what ``ctr images import`` reads)."""
    archive.unlink(missing_ok=True)
    buildah("push", "-q", image, f"docker-archive:{archive}:{name}", timeout=900)
    return archive
