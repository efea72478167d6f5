"""Thaw: restore GPU inference pods from CRIU + CUDA checkpoint snapshots."""

__version__ = "0.1.0"
