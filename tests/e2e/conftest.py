"""Fixtures for the real-cluster test: the cluster, Thaw wired into it, workload images.

Package-scoped: the cluster (etcd, kube-apiserver, kubelet, containerd) stops when the last test
here has run, not at the end of the whole session, so it does not take CPU from the rest of the
suite. The images themselves are session fixtures (tests/images.py), built once for every user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import SUMMARY, Cluster, Thaw, unavailable
from tests.e2e.workloads import Workload
from tests.images import Buildah, build_workload_image, export_image, missing_image_tools, require

# The names the node's containerd knows the images by (imported, never pulled: imagePullPolicy Never).
E2E_THAW_IMAGE = "localhost/thaw:e2e"


@pytest.fixture(scope="package")
def cluster() -> Iterator[Cluster]:
    require(unavailable() or missing_image_tools())
    c = Cluster()
    t0 = time.monotonic()
    c.up()
    print(f"\ne2e: control plane and node up in {time.monotonic() - t0:.1f} s")
    try:
        yield c
    finally:
        c.down()


def _load(cluster: Cluster, buildah: Buildah, image: str, name: str, scratch: Path) -> None:
    """Put a built image into the node's containerd as ``name`` (a docker-archive through ``ctr``)."""
    archive = export_image(buildah, image, scratch / "image.tar", name)
    try:
        cluster.import_image(archive)
    finally:
        archive.unlink(missing_ok=True)


@pytest.fixture(scope="package")
def thaw(
    cluster: Cluster, buildah: Buildah, thaw_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Thaw]:
    run = tmp_path_factory.mktemp("thaw-e2e")
    _load(cluster, buildah, thaw_image, E2E_THAW_IMAGE, run)
    t = Thaw(cluster, run, E2E_THAW_IMAGE)
    try:
        t.start()
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="package")
def workload_image(
    cluster: Cluster, buildah: Buildah, debian_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Workload], str]:
    """Builds (once per workload) and imports the image a workload runs in; returns its name."""
    built: dict[str, str] = {}
    out = tmp_path_factory.mktemp("workload-images")

    def get(workload: Workload) -> str:
        if workload.name not in built:
            ref = f"localhost/thaw-workload-{workload.name}:e2e"
            build_workload_image(
                buildah, debian_base, ref, workload.program, packages=workload.packages, files=workload.files
            )
            _load(cluster, buildah, ref, ref, out)
            built[workload.name] = ref
        return built[workload.name]

    return get


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(f"e2e {line}")
