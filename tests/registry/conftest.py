"""Fixtures of the registry tests: a real distribution server (tests/registry/server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images import require
from tests.registry.server import Registry, missing_tools, running_registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with TLS (a CA from thaw certs) and htpasswd auth, one per test module."""
    require(missing_tools())
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry with TLS and token auth: Bearer challenges answered by a token server."""
    require(missing_tools())
    with running_registry(tmp_path_factory.mktemp("token-registry"), auth="token") as reg:
        yield reg


@pytest.fixture
def fresh_registry(tmp_path: Path) -> Iterator[Registry]:
    """A registry of the test's own (for tests that stop it or tamper with its blobs)."""
    require(missing_tools())
    with running_registry(tmp_path / "registry") as reg:
        yield reg
