"""``thaw check``: a preflight that says, line by line, whether a node and a cluster can restore.

``thaw check node`` (on a GPU node, or in a pod there) and ``thaw check cluster`` (with a kubeconfig):
each line passes, fails with what to do, or warns; exit 1 when a line fails. ``lines`` holds the
line type and rendering, ``node`` and ``cluster`` the checks (pure functions of what was read, with
thin I/O around them).

Imports ``thaw.contract``, ``thaw.snapshot``, ``thaw.runtime`` (CRIU and the CUDA probe),
``thaw.node`` (the agent's policy check) and ``thaw.errors``.
"""
