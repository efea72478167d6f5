"""Issue 6: the CUDA checkpoint of a tree of ranks, against a stand-in for libcuda's checkpoint API
(this machine has no GPU; bench/gpu runs the real driver). The stand-in keeps each process's state
as the driver does and records the calls, so the order (all locked before any is checkpointed),
the concurrency (ranks at once within a step) and the undo after a failure are checked exactly."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from thaw.runtime.cuda import Cuda, CudaError, ProcessState, format_uuid, gpu_remap, parse_uuid

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
        self.restore_args: dict[int, tuple[list[tuple[bytes, bytes]], bytes]] = {}
        self.devices = [bytes(range(16)), bytes(range(16, 32))]  # this container's GPUs, CUDA order

    def cuDeviceGetCount(self, out: Any) -> int:
        out._obj.value = len(self.devices)
        return OK

    def cuDeviceGet(self, out: Any, ordinal: int) -> int:
        out._obj.value = ordinal
        return OK

    def cuDeviceGetUuid_v2(self, out: Any, dev: Any) -> int:
        out._obj.bytes[:] = list(self.devices[dev.value])
        return OK

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

    def cuCheckpointProcessRestore(self, pid: Any, args: Any) -> int:
        a = args._obj  # CUcheckpointRestoreArgs as the driver would read it
        pairs = [
            (bytes(a.gpuPairs[i].oldUuid.bytes), bytes(a.gpuPairs[i].newUuid.bytes))
            for i in range(a.gpuPairsCount)
        ]
        with self.lock:
            self.restore_args[pid.value] = (pairs, bytes(a))
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


# --- restoring onto other GPUs ----------------------------------------------------------------

A = "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"  # the stand-in's GPU 0
B = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"  # its GPU 1
X = "GPU-e127b204-c9b7-2af2-5b9f-09825cd678f2"  # GPUs of the machine the checkpoint was taken on
Y = "GPU-ad9af744-de18-081b-7eb9-396651549436"


def test_uuids_in_cuda_order_written_like_nvidia_smi() -> None:
    assert cuda(FakeCheckpointApi(RANKS)).gpu_uuids() == [A, B]
    assert format_uuid(parse_uuid(X)) == X
    with pytest.raises(ValueError, match="not a GPU UUID"):
        parse_uuid("GPU-1234")


@pytest.mark.parametrize(
    ("old", "new", "pairs"),
    [
        ([], [A, B], None),  # a snapshot that recorded no UUIDs: the driver's default
        ([A, B], [A, B], None),  # the same GPUs: no pairs, exactly the call that was measured
        ([X, Y], [A, B], [(X, A), (Y, B)]),  # another node: ordinal i onto ordinal i
        ([X, Y], [B, A], [(X, B), (Y, A)]),
    ],
)
def test_gpu_remap(old: list[str], new: list[str], pairs: Any) -> None:
    assert gpu_remap(old, new) == pairs


def test_gpu_remap_refuses_another_count() -> None:
    with pytest.raises(ValueError, match="2 GPUs cannot be mapped onto this container's 1"):
        gpu_remap([X, Y], [A])


def test_restore_passes_every_pair_to_every_rank() -> None:
    api = FakeCheckpointApi(RANKS[:2])
    c = cuda(api)
    c.freeze(RANKS[:2], 1000)
    c.thaw(RANKS[:2], [(X, A), (Y, B)])
    want = [(parse_uuid(X), parse_uuid(A)), (parse_uuid(Y), parse_uuid(B))]
    assert {pid: pairs for pid, (pairs, _) in api.restore_args.items()} == dict.fromkeys(RANKS[:2], want)
    assert set(api.states.values()) == {ProcessState.RUNNING}


def test_restore_without_pairs_passes_64_zero_bytes() -> None:
    api = FakeCheckpointApi(RANKS[:2])
    c = cuda(api)
    c.freeze(RANKS[:2], 1000)
    c.thaw(RANKS[:2])
    assert [raw for _, raw in api.restore_args.values()] == [bytes(64)] * 2


def test_unreadable_uuids_mean_no_remap_never_a_failure() -> None:
    from thaw.runtime.gpu import gpu_uuids_or_none

    class NoUuids(FakeCheckpointApi):
        def cuDeviceGetCount(self, out: Any) -> int:
            return NOT_SUPPORTED

    assert gpu_uuids_or_none(cuda(FakeCheckpointApi(RANKS))) == [A, B]
    assert gpu_uuids_or_none(cuda(NoUuids(RANKS))) is None
    assert gpu_uuids_or_none(None) is None


# --- lock timeouts while ranks wait on each other ----------------------------------------------

NOT_READY = 600


class Deadlocking(FakeCheckpointApi):
    """Rank 4129's lock times out ``times`` times (its all-reduce waits for a rank already locked),
    then succeeds, as once every rank was unlocked the collective could finish."""

    def __init__(self, pids: list[int], times: int) -> None:
        super().__init__(pids)
        self.times = times

    def cuCheckpointProcessLock(self, pid: Any, args: Any) -> int:
        if pid.value == 4129 and self.times > 0:
            self.times -= 1
            with self.lock:
                self.calls.append(("lock", pid.value))
            return NOT_READY
        return super().cuCheckpointProcessLock(pid, args)


def test_a_lock_timeout_unlocks_every_rank_and_tries_again() -> None:
    api = Deadlocking(RANKS, times=2)
    assert cuda(api).freeze_retrying(RANKS, 1000, attempts=3, pause_s=0) == 3
    assert set(api.states.values()) == {ProcessState.CHECKPOINTED}
    # between the attempts the ranks that had locked were unlocked (the collective can finish)
    assert sorted(p for n, p in api.calls if n == "unl") == sorted([p for p in RANKS if p != 4129] * 2)


def test_lock_timeouts_past_the_attempts_fail_with_every_rank_running() -> None:
    api = Deadlocking(RANKS, times=5)
    with pytest.raises(CudaError, match=r"cuCheckpointProcessLock\(pid 4129\).*\(600\)"):
        cuda(api).freeze_retrying(RANKS, 1000, attempts=2, pause_s=0)
    assert set(api.states.values()) == {ProcessState.RUNNING}


def test_other_failures_are_not_retried() -> None:
    api = FakeCheckpointApi(RANKS, fail={("ckpt", 4130): NOT_SUPPORTED})
    with pytest.raises(CudaError, match="NOT_SUPPORTED"):
        cuda(api).freeze_retrying(RANKS, 1000, attempts=5, pause_s=0)
    assert [n for n, _ in api.calls].count("ckpt") == 4  # one attempt


def test_any_failure_reading_uuids_means_no_remap() -> None:
    from thaw.runtime.gpu import gpu_uuids_or_none

    class Odd(FakeCheckpointApi):
        def cuDeviceGetUuid_v2(self, out: Any, dev: Any) -> int:
            raise TypeError("an unexpected driver binding")

    assert gpu_uuids_or_none(cuda(Odd(RANKS))) is None
