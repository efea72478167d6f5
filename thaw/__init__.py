"""Thaw: restore GPU inference pods from CRIU + CUDA checkpoint snapshots.

By concern (DESIGN.md, "Layout"): ``contract`` (formats and pure rules), ``snapshot`` (store, cache,
fetch), ``runtime`` (``thaw exec``: processes, CRIU, CUDA), ``node`` (the agent and ``thaw
status``), ``serve`` (HTTP servers and certificates), ``dev`` (demo and test scaffolding, not
shipped); ``errors`` and ``cli`` above them.
"""

__version__ = "0.1.0"
