"""The Dockerfile builds, with no registry and no Docker daemon: buildah over a debootstrapped base.

tests/images.py builds the image once per session (the e2e test runs the same image in real pods);
this module checks it: the entrypoint, the non-root user, the runtime and CRIU >= 4.2 in it, and the
webhook's default ``thaw-tools`` command copying the runtime as the image's user into a root-owned
directory, as kubelet's emptyDir is. Several minutes: slow.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.images import Buildah
from webhook.config import WebhookConfig
from webhook.patches import TOOLS_DIR

pytestmark = [pytest.mark.slow]


def test_image_config(buildah: Buildah, thaw_image: str) -> None:
    cfg = json.loads(buildah("inspect", "--type", "image", thaw_image))["OCIv1"]["config"]
    assert cfg["Entrypoint"] == ["/opt/thaw/bin/thaw"]
    assert cfg["User"] == "65532:65532"
    assert "THAW_CRIU=/opt/thaw/bin/criu" in cfg["Env"]


def test_image_runs_the_runtime_and_criu(buildah: Buildah, thaw_image: str) -> None:
    ctr = buildah("from", "--pull-never", thaw_image).strip()
    try:
        run = ("run", "--isolation", "chroot", ctr, "--")
        assert "webhook" in buildah(*run, "/opt/thaw/bin/thaw", "--help")
        version = buildah(*run, "/opt/thaw/bin/criu", "--version")
        m = re.search(r"Version:\s*(\d+)\.(\d+)", version)
        assert m and (int(m.group(1)), int(m.group(2))) >= (4, 2), version
        # What the thaw-tools init container does: the webhook's default command, as the image's
        # user (65532), into a directory that root owns with mode 0777 (an emptyDir), then the copy
        # runs from its new place.
        buildah(
            "run",
            "--isolation",
            "chroot",
            "--user",
            "0:0",
            ctr,
            "--",
            "install",
            "-d",
            "-m",
            "0777",
            TOOLS_DIR,
        )
        buildah(*run, *WebhookConfig().tools_command)
        assert "certs" in buildah(*run, f"{TOOLS_DIR}/bin/thaw", "--help")
    finally:
        buildah("rm", ctr)
