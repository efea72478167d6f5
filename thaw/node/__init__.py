"""The Kubernetes API from a node: the agent (cache upkeep, node annotations, Events from pods'
outcomes) and ``thaw status``.

Imports ``thaw.contract``, ``thaw.snapshot`` and ``thaw.errors``.
"""
