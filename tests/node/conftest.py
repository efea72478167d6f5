"""The real kube-apiserver fixture for thaw check's cluster tests (tests/controlplane.py)."""

from tests.controlplane import control_plane  # noqa: F401
