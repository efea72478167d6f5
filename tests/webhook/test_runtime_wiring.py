"""The two init containers work with Thaw's own image, as real pods showed they must (issue 10).

- ``thaw-tools``: the image runs as 65532 and kubelet's emptyDir at /thaw is root's (mode 0777).
  The default command must copy the runtime there whatever ``cp`` the image has; ``cp -a`` fails
  (GNU: "preserving times for '/thaw/.': Operation not permitted"), so this runs the real commands
  as that user into such a directory, with GNU cp and with busybox.
- ``thaw-fetch``: it must find the same CRIU that the workload's copy of the runtime carries, or
  its node facts say "criu none" and every plan is cold; the image's own env must not be needed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FIXTURES
from tests.webhook.helpers import annotated, answer, apply, load_review
from webhook.config import WebhookConfig
from webhook.patches import CRIU_BIN, FETCH_CONTAINER, RUNTIME_BIN, TOOLS_CONTAINER, TOOLS_DIR

IMAGE_USER = 65532  # the Dockerfile's USER
IMAGE_RUNTIME = "/opt/thaw"  # where the Dockerfile puts the runtime bundle

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs cp as another user: needs root")


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """A runtime-like tree readable by the image's user, and an emptyDir-like destination."""
    base = Path(tempfile.mkdtemp(prefix="thaw-tools-", dir="/tmp"))
    try:
        base.chmod(0o755)
        src = base / "opt-thaw"
        (src / "bin").mkdir(parents=True)
        (src / "lib").mkdir()
        (src / "bin" / "thaw").write_text("#!/bin/sh\necho thaw\n")
        (src / "bin" / "thaw").chmod(0o755)
        (src / "lib" / "libx.so").write_bytes(b"\x7fELF" + bytes(64))
        (src / "bin" / "criu").symlink_to("../lib/libx.so")
        for d in (src, src / "bin", src / "lib"):
            d.chmod(0o755)
        dest = base / "thaw"
        dest.mkdir(mode=0o777)
        dest.chmod(0o777)  # kubelet's emptyDir: root's, 0777
        yield src, dest
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _as_image_user(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, user=IMAGE_USER, group=IMAGE_USER)


def _localised(command: tuple[str, ...], src: Path, dest: Path) -> list[str]:
    """The configured command with the image's paths replaced by the test's."""
    assert command[-2:] == (f"{IMAGE_RUNTIME}/.", f"{TOOLS_DIR}/"), command
    return [*command[:-2], f"{src}/.", f"{dest}/"]


CPS = [pytest.param([], id="gnu-cp")]
if Path("/bin/busybox").exists():
    CPS.append(pytest.param(["/bin/busybox"], id="busybox-cp"))


@needs_root
@pytest.mark.parametrize("prefix", CPS)
def test_default_tools_command_copies_as_the_image_user(prefix: list[str], dirs: tuple[Path, Path]) -> None:
    src, dest = dirs
    out = _as_image_user([*prefix, *_localised(WebhookConfig().tools_command, src, dest)])
    assert out.returncode == 0, out.stderr
    assert (dest / "bin" / "thaw").read_text() == (src / "bin" / "thaw").read_text()
    assert stat.S_IMODE((dest / "bin" / "thaw").stat().st_mode) & 0o111, "the CLI must stay executable"
    assert os.readlink(dest / "bin" / "criu") == "../lib/libx.so", "symlinks must stay links"
    assert (
        subprocess.run([dest / "bin" / "thaw"], capture_output=True, text=True, check=True).stdout == "thaw\n"
    )


@needs_root
def test_cp_a_fails_there(dirs: tuple[Path, Path]) -> None:
    """The setting above is the one that breaks ``cp -a``: the test can tell the two apart."""
    src, dest = dirs
    out = _as_image_user(["cp", "-a", f"{src}/.", f"{dest}/"])
    assert out.returncode != 0 and "preserving times" in out.stderr, out


def test_fetch_runs_with_the_runtime_criu() -> None:
    review = annotated(load_review(FIXTURES / "admissionreview-v1-pod-create.request.json"))
    status, out = answer(review, restore=True)
    assert status == 200 and out["response"]["allowed"]
    pod = apply(review["request"]["object"], out["response"])
    init = {c["name"]: c for c in pod["spec"]["initContainers"]}
    fetch_env = {e["name"]: e.get("value") for e in init[FETCH_CONTAINER]["env"]}
    target_env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    # The fetch container runs the image's runtime; the workload runs the copy thaw-tools made of
    # it. Both must name the same CRIU of the same bundle, so both see the same node facts.
    assert init[FETCH_CONTAINER]["command"][0] == RUNTIME_BIN
    assert fetch_env["THAW_CRIU"] == IMAGE_RUNTIME + CRIU_BIN.removeprefix(TOOLS_DIR)
    assert target_env["THAW_CRIU"] == CRIU_BIN
    assert init[TOOLS_CONTAINER]["command"][-2:] == [f"{IMAGE_RUNTIME}/.", f"{TOOLS_DIR}/"]
