"""The PID floor in a container (issue 10.6): how long ``thaw exec`` takes to move the PID counter to
``--pid-floor`` (4096) where ``/proc/sys`` is read-only, as in every runc container.

Each method runs in a fresh pod (thaw/dev/sandbox.py: new PID and mount namespaces, fresh tmpfs over
the writable places, /proc/sys read-only) with exactly the capabilities the webhook gives a Thaw
pod (the runtime's defaults + CHECKPOINT_RESTORE + SYS_PTRACE), inside a process that has imported
what ``thaw exec`` imports (fork's cost grows with the parent's memory):

- ``fork``: ``os.fork`` + ``waitpid`` until a child gets PID 4095 (the baseline: thaw exec before);
- ``vfork``: ``clone(CLONE_VM | CLONE_VFORK)`` children running ``_exit`` (thaw exec now);
- ``clone3 set_tid``: one child placed at 4095 with ``clone3``'s ``set_tid``, then one ``fork``: the
  PID that fork gets shows whether the counter moved (it does not: the kernel's set_tid path does
  not advance the cyclic allocator).

Goal: ``vfork`` reaches the floor in under 0.5 s, and at least 10x faster than ``fork``.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import not_run
from thaw.dev.sandbox import (
    REPO,
    THAW_CAPS,
    fresh_container_prefix,
    missing_prerequisites,
    pod_env,
    with_caps,
)

FLOOR = 4096
GOAL_S = 0.5
GOAL_SPEEDUP = 10.0

PROBE = r"""
import ctypes, json, os, struct, sys, time
import thaw.runtime.execute  # a thaw-exec-sized process
from thaw.runtime import supervisor as s
floor, method = int(sys.argv[1]), sys.argv[2]
t = time.monotonic()
if method == "fork":
    last = s.take_pids_until(floor, s._fork_exit)
elif method == "vfork":
    last = s.take_pids_until(floor, s._VforkExit())
else:  # clone3 with set_tid = floor - 1 (struct clone_args, 11 u64), then one fork
    libc = ctypes.PyDLL(None, use_errno=True)
    tid = (ctypes.c_int * 1)(floor - 1)
    args = struct.pack("11Q", 0, 0, 0, 0, 17, 0, 0, 0, ctypes.addressof(tid), 1, 0)
    buf = ctypes.create_string_buffer(args, len(args))
    last = libc.syscall(ctypes.c_long(435), buf, ctypes.c_size_t(len(args)))
    if last == 0:
        os._exit(0)
    if last < 0:
        print(json.dumps({"error": os.strerror(ctypes.get_errno())}))
        sys.exit(0)
    os.waitpid(last, 0)
took = time.monotonic() - t
nxt = os.fork()
if nxt == 0:
    os._exit(0)
os.waitpid(nxt, 0)
print(json.dumps({"seconds": round(took, 4), "last": last, "next_pid": nxt}))
"""


def run_method(method: str) -> dict[str, object]:
    env = pod_env()
    argv = [
        "unshare", "--pid", "--fork", "--mount-proc", *fresh_container_prefix(env), *with_caps(THAW_CAPS),
        sys.executable, "-c", PROBE, str(FLOOR), method,
    ]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"error": (out.stderr or out.stdout).strip()[-300:]}
    value: dict[str, object] = json.loads(lines[-1])
    return value


def main(argv: list[str]) -> int:
    why = missing_prerequisites()
    if why:
        return not_run("pid_floor", why)
    results = {m: run_method(m) for m in ("fork", "vfork", "clone3 set_tid")}
    print(
        f"{'method':<16} {'seconds':>8} {'next PID':>9}  (floor {FLOOR}; fresh pod, the pod's capabilities)"
    )
    for method, r in results.items():
        if "error" in r:
            print(f"{method:<16} error: {r['error']}")
        else:
            print(f"{method:<16} {r['seconds']:>8} {r['next_pid']:>9}")
    fork, vfork = results["fork"], results["vfork"]
    ok = (
        "error" not in vfork
        and "error" not in fork
        and int(str(vfork["next_pid"])) >= FLOOR
        and float(str(vfork["seconds"])) < GOAL_S
        and float(str(fork["seconds"])) >= GOAL_SPEEDUP * float(str(vfork["seconds"]))
    )
    print(
        f"goal: vfork reaches {FLOOR} in < {GOAL_S} s, >= {GOAL_SPEEDUP:g}x faster than fork: "
        + ("met" if ok else "MISSED")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
