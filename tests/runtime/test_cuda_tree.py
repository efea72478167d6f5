"""Issue 6: the CUDA checkpoint of a tree of ranks, against a stand-in for libcuda's checkpoint API
(this machine has no GPU; bench/gpu runs the real driver). The stand-in keeps each process's state
as the driver does and records the calls, so the order (all locked before any is checkpointed),
the concurrency (ranks at once within a step) and the undo after a failure are checked exactly."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from thaw.cuda import Cuda, CudaError, ProcessState

OK, INVALID_VALUE, NOT_SUPPORTED = 0, 1, 801


class FakeCheckpointApi:
    """cuCheckpointProcess* with the driver's state machine; ``fail`` maps (call, pid) to an error
    code; ``meet`` makes every call of a step wait until all ranks are inside it."""

    def __init__(self, pids: list[int], fail: dict[tuple[str, int], int] | None = None, meet: bool = False):
        self.states = dict.fromkeys(pids, ProcessState.RUNNING)
        self.fail = fail or {}
        self.calls: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.barriers = {
            step: threading.Barrier(len(pids), timeout=5) for step in ("lock", "ckpt", "rst", "unl")
        }
        self.meet = meet

    def _step(self, name: str, pid: Any, want: ProcessState, then: ProcessState) -> int:
        pid = pid.value
        with self.lock:
            self.calls.append((name, pid))
        if self.meet:
            self.barriers[name].wait()  # a serial caller would never get every rank here at once
        code = self.fail.get((name, pid), OK)
        if code != OK:
            return code
        if self.states[pid] != want:
            return INVALID_VALUE
        self.states[pid] = then
        return OK

    def cuCheckpointProcessLock(self, pid: Any, _args: Any) -> int:
        return self._step("lock", pid, ProcessState.RUNNING, ProcessState.LOCKED)

    def cuCheckpointProcessCheckpoint(self, pid: Any, _args: Any) -> int:
        return self._step("ckpt", pid, ProcessState.LOCKED, ProcessState.CHECKPOINTED)

    def cuCheckpointProcessRestore(self, pid: Any, _args: Any) -> int:
        return self._step("rst", pid, ProcessState.CHECKPOINTED, ProcessState.LOCKED)

    def cuCheckpointProcessUnlock(self, pid: Any, _args: Any) -> int:
        return self._step("unl", pid, ProcessState.LOCKED, ProcessState.RUNNING)

    def cuCheckpointProcessGetState(self, pid: Any, out: Any) -> int:
        if pid.value not in self.states:
            return INVALID_VALUE
        out._obj.value = int(self.states[pid.value])
        return OK

    def cuGetErrorName(self, code: int, out: Any) -> int:
        names = {INVALID_VALUE: b"CUDA_ERROR_INVALID_VALUE", NOT_SUPPORTED: b"CUDA_ERROR_NOT_SUPPORTED"}
        out._obj.value = names.get(code, b"CUDA_ERROR_UNKNOWN")
        return OK


RANKS = [4128, 4129, 4130, 4131]


def cuda(api: FakeCheckpointApi, serial: bool = False) -> Cuda:
    return Cuda(lib=api, serial=serial)  # type: ignore[arg-type]


def test_freeze_then_thaw_every_rank_at_once_each_step_before_the_next() -> None:
    api = FakeCheckpointApi(RANKS, meet=True)
    c = cuda(api)
    assert c.cuda_pids([1, *RANKS]) == RANKS  # pid 1 holds no CUDA state
    c.freeze(RANKS, 1000)
    assert set(api.states.values()) == {ProcessState.CHECKPOINTED}
    steps = [name for name, _ in api.calls]
    assert steps == ["lock"] * 4 + ["ckpt"] * 4  # no rank checkpointed while another still runs
    api.calls.clear()
    c.thaw(RANKS)
    assert set(api.states.values()) == {ProcessState.RUNNING}
    assert [name for name, _ in api.calls] == ["rst"] * 4 + ["unl"] * 4


def test_serial_mode_one_rank_after_another() -> None:
    api = FakeCheckpointApi(RANKS)
    c = cuda(api, serial=True)
    c.freeze(RANKS, 1000)
    assert api.calls == [("lock", p) for p in RANKS] + [("ckpt", p) for p in RANKS]


def test_a_rank_that_fails_to_checkpoint_leaves_every_rank_running() -> None:
    api = FakeCheckpointApi(RANKS, fail={("ckpt", 4130): NOT_SUPPORTED})
    with pytest.raises(
        CudaError, match=r"cuCheckpointProcessCheckpoint\(pid 4130\).*CUDA_ERROR_NOT_SUPPORTED"
    ):
        cuda(api).freeze(RANKS, 1000)
    assert set(api.states.values()) == {ProcessState.RUNNING}
    undo = sorted(c for c in api.calls if c[0] in ("rst", "unl"))
    assert undo == sorted([("rst", p) for p in RANKS if p != 4130] + [("unl", p) for p in RANKS])


def test_a_rank_that_fails_to_lock_unlocks_the_others_and_checkpoints_none() -> None:
    api = FakeCheckpointApi(RANKS, fail={("lock", 4128): INVALID_VALUE})
    with pytest.raises(CudaError, match=r"cuCheckpointProcessLock\(pid 4128\)"):
        cuda(api).freeze(RANKS, 1000)
    assert not [c for c in api.calls if c[0] == "ckpt"]
    assert sorted(p for n, p in api.calls if n == "unl") == RANKS[1:]
    assert set(api.states.values()) == {ProcessState.RUNNING}


def test_thaw_reports_the_first_failing_rank_and_unlocks_none() -> None:
    api = FakeCheckpointApi(RANKS, fail={("rst", 4131): INVALID_VALUE, ("rst", 4129): INVALID_VALUE})
    c = cuda(api)
    c.freeze(RANKS, 1000)
    with pytest.raises(CudaError, match=r"cuCheckpointProcessRestore\(pid 4129\)"):
        c.thaw(RANKS)
    # the caller kills the restored tree and cold-starts: no rank may run on half a server
    assert ProcessState.RUNNING not in set(api.states.values())


def test_lock_passes_the_timeout_to_the_driver() -> None:
    seen: list[int] = []

    class Api(FakeCheckpointApi):
        def cuCheckpointProcessLock(self, pid: Any, args: Any) -> int:
            seen.append(args._obj.timeoutMs)
            return super().cuCheckpointProcessLock(pid, args)

    cuda(Api(RANKS[:1])).freeze(RANKS[:1], 2500)
    assert seen == [2500]
