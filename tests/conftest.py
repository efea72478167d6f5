"""Shared test fixtures: the captured Kubernetes requests in ../shared/fixtures/k8s/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# Session-wide image builds (debootstrap + buildah), shared by tests/manifests and tests/e2e.
from tests.images import buildah, debian_base, thaw_image  # noqa: F401

REPO = Path(__file__).resolve().parent.parent


# A verbatim copy of ../shared/fixtures/k8s (requests captured from a real kube-apiserver and
# kube-scheduler), kept in the repository so a clone tests without the workplace's shared folder.
FIXTURES = REPO / "tests" / "fixtures" / "k8s"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
