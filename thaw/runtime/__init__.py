"""The workload's wrapper, ``thaw exec``: processes, CRIU and CUDA (PID 1 duties, restore,
checkpoint, GPU layout, readiness, calling the sleep and wake hooks).

Imports ``thaw.contract``, ``thaw.snapshot`` and ``thaw.errors``; never Flask or the Kubernetes
client (it runs in every workload pod).
"""
