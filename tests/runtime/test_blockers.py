"""Issue 10.3: a tree whose processes hold GPU device files without CUDA state (PyTorch inductor's
compile workers) is refused before the CUDA lock and before CRIU, in one line naming the processes,
what they hold, the likely cause and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.runtime.pods import REPO, read_json, thaw_env, wait_for
from thaw.runtime import blockers
from thaw.runtime.blockers import (
    COMPILE_WORKER_FIX,
    Holder,
    cuda_restore_hint,
    gpu_holders,
    gpu_holders_refusal,
    holders_refusal,
    mapped_devices,
)

WORKER = "/usr/bin/python3 /opt/venv/lib/python3.12/site-packages/torch/_inductor/compile_worker/__main__.py --pickler=x --kind=fork --workers=16 --parent=4096"  # noqa: E501

MAPS = """\
7f0000000000-7f0000200000 rw-s 00000000 00:06 812 /dev/nvidiactl
7f0000200000-7f0000400000 rw-s 00000000 00:06 813 /dev/nvidia0
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
7f0000600000-7f0000601000 r--p 00000000 08:01 99 /usr/lib/libc.so.6
7f0000601000-7f0000602000 rw-s 00000000 00:06 814 /dev/nvidia-uvm
"""


def test_mapped_devices_reads_only_gpu_device_mappings() -> None:
    assert mapped_devices(MAPS) == ["/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"]
    assert mapped_devices("") == []


def test_holders_are_the_processes_without_cuda_state() -> None:
    fds = {
        4096: {3: "/dev/nvidiactl", 4: "/dev/nvidia0"},  # the server: has CUDA state
        4200: {5: "/dev/nvidiactl", 6: "/dev/null"},
        4201: {1: "pipe:[1]"},
        4202: {7: "/dev/nvidia-uvm"},
    }
    maps = {4096: ["/dev/nvidia0"], 4201: [], 4202: ["/dev/nvidia0", "/dev/nvidia0"]}
    cmd = {4200: WORKER, 4201: "python3 helper.py", 4202: WORKER}
    holders = gpu_holders([4096, 4200, 4201, 4202], [4096], fds, maps, cmd)
    assert holders == [
        Holder(4200, WORKER, ("/dev/nvidiactl",), 0),
        Holder(4202, WORKER, ("/dev/nvidia-uvm", "/dev/nvidia0"), 2),
    ]
    assert all(h.compile_worker for h in holders)


def test_compile_workers_get_one_line_with_the_fix() -> None:
    holders = [Holder(p, WORKER, ("/dev/nvidia0", "/dev/nvidiactl"), 3) for p in range(4200, 4216)]
    line = holders_refusal(holders)
    assert line is not None and "\n" not in line
    assert "16 processes" in line and "pid 4200-4215 (16 x " in line
    assert "/dev/nvidia0, /dev/nvidiactl (48 mappings)" in line
    assert "inductor's compile workers" in line and COMPILE_WORKER_FIX in line
    assert holders_refusal([]) is None


def test_other_holders_get_the_general_cause() -> None:
    line = holders_refusal(
        [Holder(4100, "python3 front.py", ("/dev/nvidiactl",), 0), Holder(4300, WORKER, ("/dev/nvidia0",), 1)]
    )
    assert line is not None
    assert "pid 4100 (python3 front.py): /dev/nvidiactl (open)" in line
    assert "pid 4300 (" in line and "…" in line  # the long command line is cut
    assert "NVML left initialised" in line and "nvmlShutdown" in line
    assert "TORCHINDUCTOR_COMPILE_THREADS=1" in line  # some of them are compile workers


# A "compile worker" that opens and maps a device file, the way inductor's workers hold /dev/nvidia*.
HOLDER = """
import mmap, os, sys, time
fd = os.open("/dev/zero", os.O_RDWR)
m = mmap.mmap(fd, 4096, mmap.MAP_PRIVATE)
print("ready", flush=True)
time.sleep(60)
"""


def test_live_processes_are_read_from_proc() -> None:
    from thaw.runtime.criu import fd_targets

    argv = [sys.executable, "-c", HOLDER, "torch/_inductor/compile_worker/__main__.py"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        pids = [p.pid for p in procs]
        line = gpu_holders_refusal(pids, [], {p: fd_targets(p) for p in pids}, prefix="/dev/zero")
        assert line is not None and "2 processes" in line and "/dev/zero (2 mappings)" in line
        assert "compile workers" in line and COMPILE_WORKER_FIX in line
        # the process with CUDA state is not a holder
        assert gpu_holders_refusal(pids, pids, {p: fd_targets(p) for p in pids}, prefix="/dev/zero") is None
    finally:
        for p in procs:
            p.kill()
            p.wait()


# thaw exec with what this machine lacks stood in for: a server whose two forked "compile workers"
# keep /dev/zero open and mapped (their open files shown to thaw as /dev/nvidia0, so it looks for
# CUDA state; the holders are then found under /dev/zero); a driver that says the server (the
# tree's root) has CUDA state. THAW_CRIU is /bin/false: had CRIU run, the reason would be its failure.
FAKE_GPU_EXEC = """
import sys
import thaw.runtime.blockers as b
import thaw.runtime.criu as criu
import thaw.runtime.cuda as cuda
from thaw.cli import main

real_fds = criu.fd_targets
criu.fd_targets = lambda pid: {fd: t.replace("/dev/zero", "/dev/nvidia0") for fd, t in real_fds(pid).items()}
b.GPU_DEVICE_PREFIX = "/dev/zero"  # the mappings, read from /proc as they are

class FakeCuda:
    locked = []
    def cuda_pids(self, pids):
        return [min(pids)]
    def freeze_retrying(self, pids, *a, **k):
        FakeCuda.locked += pids
        raise AssertionError("the CUDA lock must not be reached")
    def gpu_uuids(self):
        return []

cuda.Cuda.load = classmethod(lambda cls, *a: FakeCuda())
sys.exit(main(sys.argv[1:]))
"""

SERVER_WITH_WORKERS = """
import http.server, mmap, os, sys, time
for _ in range(2):
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c",
            "import mmap,os,time; fd=os.open('/dev/zero', os.O_RDWR)\\n"
            "m=mmap.mmap(fd, 4096, mmap.MAP_PRIVATE)\\n"
            "parent = os.getppid()\\nwhile os.getppid() == parent: time.sleep(0.1)",
            "torch/_inductor/compile_worker/__main__.py"])
time.sleep(0.5)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_thaw_exec_refuses_before_the_lock_and_criu(tmp_path: Path) -> None:
    port, outcome = 8175, tmp_path / "o.json"
    argv = [
        sys.executable, "-c", FAKE_GPU_EXEC, "exec", "--checkpoint", "on-ready", "--ready",
        f"http://127.0.0.1:{port}/", "--store", str(tmp_path / "store"), "--name", "n", "--workload", "w",
        "--outcome", str(outcome), "--pid-floor", "0",
        "--", sys.executable, "-c", SERVER_WITH_WORKERS, str(port),
    ]  # fmt: skip
    env = thaw_env({"THAW_CRIU": "/bin/false"})
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        ck = wait_for(
            lambda: (c := read_json(outcome).get("checkpoint", {})).get("status") == "failed" and c,
            30,
            "the checkpoint to be refused",
        )
        reason = ck["reason"]
        assert reason.startswith("checkpoint refused before CRIU: 2 processes")
        assert ": /dev/zero (2 mappings)" in reason, reason  # read from /proc/PID/maps
        assert COMPILE_WORKER_FIX in reason
        assert p.poll() is None  # never paused, still serving:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"ok"
    finally:
        p.terminate()
        _, err = p.communicate(timeout=20)
    assert "checkpoint failed, server keeps running: checkpoint refused before CRIU" in err


def test_shared_gpu_memory_is_named_where_the_restore_failed_as_it_does() -> None:
    hint = cuda_restore_hint(2, "CUDA_ERROR_INVALID_VALUE")
    assert "CUDA IPC" in hint and "driver 610" in hint and "NCCL_P2P_DISABLE=1" in hint
    assert cuda_restore_hint(4, "CUDA_ERROR_NOT_SUPPORTED") == hint
    assert cuda_restore_hint(1, "CUDA_ERROR_INVALID_VALUE") == ""  # one process shares with no one
    assert cuda_restore_hint(2, "CUDA_ERROR_OUT_OF_MEMORY") == ""


JAX_MAPS = [
    "/usr/lib/x86_64-linux-gnu/libc.so.6",
    "/opt/venv/lib/python3.12/site-packages/jaxlib/_jax.so",
    "/opt/venv/lib/python3.12/site-packages/jax_plugins/xla_cuda13/xla_cuda_plugin.so",
]


def test_a_cuda_process_running_jax_is_refused_with_the_fix() -> None:
    why = blockers.jax_refusal([4100, 4200], {4100: JAX_MAPS, 4200: ["/usr/bin/python3.12"]})
    assert why is not None
    assert why.startswith("checkpoint refused before CRIU: process 4100 runs JAX")
    assert blockers.JAX_FIX in why


def test_jax_outside_the_cuda_processes_and_torch_pass() -> None:
    torch = ["/opt/venv/lib/python3.12/site-packages/torch/lib/libtorch_cuda.so"]
    assert blockers.jax_refusal([4100], {4100: torch}) is None
    assert blockers.jax_refusal([], {4100: JAX_MAPS}) is None  # JAX on the CPU only: no CUDA state


def test_mapped_paths_of_a_live_process() -> None:
    paths = blockers.read_mapped_paths(os.getpid())
    assert any("python" in p for p in paths)
    assert blockers.runtime_refusal([os.getpid()]) is None
