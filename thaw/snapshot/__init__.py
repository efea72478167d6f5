"""Snapshots on disk: the store, the node cache (locks, eviction, inventory), fetching a snapshot
into the cache, page-cache residency, and this node's facts (which snapshots fit it).

Files and locks; no long-lived processes (detecting the node's facts runs ``nvidia-smi`` and ``criu
--version`` once, and reads NVML). Imports ``thaw.contract`` and ``thaw.errors``.
"""
