"""The real kube-apiserver fixture for the policy tests (tests/controlplane.py)."""

from tests.controlplane import control_plane  # noqa: F401
