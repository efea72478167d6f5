"""``python fake_cuda_exec.py PYTHON -m thaw exec ...``: ``thaw exec`` with the CUDA driver's
checkpoint API replaced by the stand-in of tests/runtime/test_cuda_tree.py (this machine has no GPU),
for the ready-gate tests: a pod's ``wrap`` puts it before the sandbox's ``python -m thaw exec``.

The stand-in takes every process ``thaw exec`` asks about as checkpointed, names each process's
``cuda-restore`` thread (tests/runtime/gate_server.py) as the driver's restore thread, and, when asked
to restore a process, records what the tree looked like meanwhile into ``$THAW_TEST_CUDA_LOG``
(JSON lines): each thread's scheduler state, whether the server answered ``$THAW_TEST_URL``, whether
``$THAW_TEST_READY`` (the ready file) existed.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from tests.runtime.test_cuda_tree import INVALID_VALUE, OK, FakeCheckpointApi
from thaw.runtime.cuda import Cuda, ProcessState


def _threads(pid: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        stat = (task / "stat").read_text()
        state = stat[stat.rindex(")") + 2]  # the field after the command name
        out[task.name] = [(task / "comm").read_text().strip(), state]
    return out


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class GateApi(FakeCheckpointApi):
    def __init__(self) -> None:
        super().__init__([1])
        self.log = Path(os.environ["THAW_TEST_CUDA_LOG"])

    def cuCheckpointProcessGetState(self, pid: Any, out: Any) -> int:
        if pid.value not in self.states and Path(f"/proc/{pid.value}").exists():
            self.states[pid.value] = ProcessState.CHECKPOINTED  # restored by CRIU, GPU memory not yet
        return super().cuCheckpointProcessGetState(pid, out)

    def cuCheckpointProcessGetRestoreThreadId(self, pid: Any, out: Any) -> int:
        for tid, (comm, _) in _threads(pid.value).items():
            if comm == "cuda-restore":
                out._obj.value = int(tid)
                return OK
        return INVALID_VALUE

    def cuCheckpointProcessRestore(self, pid: Any, args: Any) -> int:
        seen = {
            "pid": pid.value,
            "threads": _threads(pid.value),
            "answered": _answers(os.environ["THAW_TEST_URL"]),
            "ready_file": Path(os.environ["THAW_TEST_READY"]).exists(),
        }
        with self.log.open("a") as f:
            f.write(json.dumps(seen) + "\n")
        return super().cuCheckpointProcessRestore(pid, args)


Cuda.load = classmethod(lambda cls, path="": cls(lib=GateApi()))  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    # argv: this file, PYTHON, -m, thaw, exec, ...
    from thaw.cli import main

    sys.exit(main(sys.argv[4:]))
