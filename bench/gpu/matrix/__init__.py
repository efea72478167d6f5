"""The compatibility matrix (issue 10.5): one small program per pattern that real GPU servers use,
each served over HTTP, checkpointed in one fresh pod and restored in another (``python3 -m
bench.gpu.matrix``). Every program is plain user code: nothing in it knows about checkpoints."""
