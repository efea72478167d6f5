"""The contract: formats and pure rules every piece of Thaw shares (annotations, node facts and the
compat key, canonical JSON, the node inventory, the workload hash, NCCL settings, the restore plan,
the manifest and its signature, the hook forms).

No processes, no network, no Kubernetes client; the only files it reads or writes are the ones it
defines (plan, manifest, keys). Imports only ``thaw.contract.*`` and ``thaw.errors``.
"""
