"""The Dockerfile builds, with no registry and no Docker daemon: buildah over a debootstrapped base.

tests/images.py builds the image once per session (the e2e test runs the same image in real pods);
this module checks it: the entrypoint, the non-root user, the runtime and CRIU >= 4.2 in it, and the
webhook's own ``thaw-tools`` container (command, env, user and dropped capabilities, read from the
injection) installing the runtime into a root-owned node directory (a DirectoryOrCreate hostPath)
and linking it at ``/thaw/rt`` in a 0777 emptyDir; the workload then runs ``/thaw/rt/bin/thaw`` and
its CRIU as another user. Several minutes: slow.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.images import Buildah
from webhook.config import WebhookConfig
from webhook.patches import (
    CRIU_BIN,
    RUNTIME_DIR,
    RUNTIME_LINK,
    THAW_BIN,
    TOOLS_CONTAINER,
    TOOLS_DIR,
    Prepared,
)

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
    finally:
        buildah("rm", ctr)


def test_thaw_tools_installs_the_runtime_the_workload_runs(buildah: Buildah, thaw_image: str) -> None:
    """What kubelet runs for ``thaw-tools``, as the webhook injects it, then the workload's view."""
    parts = json.loads(Prepared.build(WebhookConfig()).parts)
    (tools,) = [c for c in parts["init"] if c["name"] == TOOLS_CONTAINER]
    security = tools["securityContext"]
    assert security["runAsUser"] == 0 and security["capabilities"]["drop"] == ["ALL"], security
    assert {m["mountPath"] for m in tools["volumeMounts"]} == {TOOLS_DIR, RUNTIME_DIR}
    ctr = buildah("from", "--pull-never", thaw_image).strip()
    try:
        as_root = ("run", "--isolation", "chroot", "--user", "0:0", ctr, "--")
        # The volumes as kubelet makes them: the emptyDir 0777, the hostPath root's 0755.
        buildah(*as_root, "install", "-d", "-m", "0777", TOOLS_DIR)
        buildah(*as_root, "install", "-d", "-m", "0755", RUNTIME_DIR)
        env = [f"--env={e['name']}={e['value']}" for e in tools["env"]]
        buildah(
            "run", "--isolation", "chroot", "--user", "0:0", "--cap-drop", "ALL", *env, ctr, "--",
            *tools["command"],
        )  # fmt: skip
        link = buildah(*as_root, "readlink", RUNTIME_LINK).strip()
        assert re.fullmatch(rf"{RUNTIME_DIR}/sha256-[0-9a-f]{{32}}", link), link
        # The workload container: another user, the runtime through the link, read only.
        as_user = ("run", "--isolation", "chroot", "--user", "1000:1000", ctr, "--")
        assert "install-runtime" in buildah(*as_user, THAW_BIN, "--help")
        version = buildah(*as_user, CRIU_BIN, "--version")
        assert re.search(r"Version:\s*4\.2", version), version
        # A second pod on the node links the same copy and copies nothing.
        buildah(*as_root, "rm", RUNTIME_LINK)
        buildah("run", "--isolation", "chroot", "--user", "0:0", "--cap-drop", "ALL", *env, ctr, "--",
                *tools["command"])  # fmt: skip
        assert buildah(*as_root, "readlink", RUNTIME_LINK).strip() == link
        assert buildah(*as_root, "ls", RUNTIME_DIR).split() == [link.rsplit("/", 1)[1]]
    finally:
        buildah("rm", ctr)
