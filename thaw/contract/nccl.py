"""The NCCL settings under which a tensor-parallel workload can be checkpointed and restored
(issue 6). One list for the webhook (which injects them) and the GPU benchmark (which runs with them).

Found by probing on 2x H200 (driver 580.159.04; ``python3 -m bench.gpu.side_by_side --tp 2
--probe-only``): a small TP=2 model checkpointed and restored through ``thaw exec`` with settings
left out one at a time. docs/tensor-parallel.md has the table ("How the set was found"), and what
each costs in serving speed ("The settings").
"""

from __future__ import annotations

NCCL_ENV: tuple[tuple[str, str], ...] = (
    # CUDA IPC between GPUs: with it on, cuCheckpointProcessRestore fails (CUDA_ERROR_INVALID_VALUE).
    ("NCCL_P2P_DISABLE", "1"),
    # cuMem allocations shared between ranks: with cuMem and the shared-memory transport both on,
    # cuCheckpointProcessRestore fails (CUDA_ERROR_NOT_SUPPORTED). Either off suffices; this one
    # keeps the shared-memory transport, 8x the bandwidth of the socket transport left otherwise.
    ("NCCL_CUMEM_ENABLE", "0"),
    # RDMA registrations cannot be dumped (and a restore lands on another node's NICs).
    ("NCCL_IB_DISABLE", "1"),
    # NVLink multicast objects cannot be checkpointed (and shared machines require it off).
    ("NCCL_NVLS_ENABLE", "0"),
    # PyTorch's NCCL heartbeat monitor would read the pause of a checkpoint or restore as a hang.
    ("TORCH_NCCL_ENABLE_MONITORING", "0"),
)
