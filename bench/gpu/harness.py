"""Run a "pod" the way Kubernetes would, on one machine, and time it: ``thaw exec`` as PID 1 of a
fresh PID and mount namespace (``unshare --pid --fork --mount-proc``) inside a fresh network
namespace, with the client in that network namespace. The pod is a fresh container, as the tests'
are (``fresh_container_prefix`` in thaw/dev/sandbox.py): new tmpfs over /tmp, /var/tmp, $HOME,
/dev/shm and $TMPDIR, the paths its spec names bound back. Used by bench/gpu/side_by_side.py and
bench/runtime_cpu.py. Standard library only (plus thaw), so it runs under any Python 3.11+.

A phase runs in a child ``unshare --net python3 -m bench.gpu.harness SPEC_JSON`` and prints one JSON
line: time from starting ``thaw exec`` to the first answer of the workload, the answers, thaw's
outcome file, and, for a checkpointing pod, the checkpoint's outcome.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from thaw.dev.sandbox import pod_command, read_json, stop_pod

REPO = Path(__file__).resolve().parents[2]
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


# A container sees only the GPUs the device plugin gave it: its /dev holds those /dev/nvidiaN files
# and no others. ``hide_dev_prefix`` gives a pod that view of this machine's /dev (a tmpfs with
# bind mounts of every entry but the hidden ones, over /dev in the pod's mount namespace).
HIDE_DEV_SH = r"""
set -e
hide=" $1 "; shift
d=$(mktemp -d /tmp/thaw-dev.XXXXXX)
mount -t tmpfs -o mode=755,nosuid tmpfs "$d"
for e in /dev/* /dev/.[!.]*; do
  [ -e "$e" ] || [ -L "$e" ] || continue
  n=${e#/dev/}
  case "$hide" in *" $n "*) continue;; esac
  if [ -L "$e" ]; then cp -P "$e" "$d/$n"
  elif [ -d "$e" ]; then mkdir "$d/$n" && mount --rbind "$e" "$d/$n" || true
  else touch "$d/$n" && mount --bind "$e" "$d/$n" || true; fi
done
mount --rbind "$d" /dev
exec "$@"
"""


def hide_dev_prefix(names: list[str]) -> list[str]:
    """argv prefix that runs the rest of the command with ``/dev/<name>`` absent (run it inside the
    pod's own mount namespace); [] for no names."""
    return ["sh", "-c", HIDE_DEV_SH, "sh", " ".join(names)] if names else []


def lo_up() -> None:
    """Bring up loopback in a new network namespace without iproute2 (the GPU image lacks it)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        ifr = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, ifr))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    finally:
        s.close()


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def request(url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any] | None:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            value: dict[str, Any] = json.loads(resp.read())
            return value
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _copy(proc: subprocess.Popen[bytes], log: Any) -> None:
    out = proc.stdout
    assert out is not None
    for chunk in iter(lambda: os.read(out.fileno(), 65536), b""):
        log.write(chunk)
        log.flush()


def _get_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers={"Connection": "close"}), timeout=timeout
        ) as r:
            r.read()
            return 200 <= int(r.status) < 400
    except (OSError, ValueError):
        return False


def _watch_ready(
    spec: dict[str, Any], proc: subprocess.Popen[bytes], t0: float, result: dict[str, Any]
) -> None:
    """Record ``first_health_s`` (spec "health": a URL) and ``ready_file_s`` (spec "ready_file": a
    path), seconds after the pod started; stops once both are seen or the pod has ended."""
    url, path = spec.get("health"), spec.get("ready_file")
    deadline = t0 + float(spec.get("timeout", 600))
    while time.monotonic() < deadline and proc.poll() is None:
        if url and "first_health_s" not in result and _get_ok(url):
            result["first_health_s"] = round(time.monotonic() - t0, 3)
        if path and "ready_file_s" not in result and os.path.exists(path):
            result["ready_file_s"] = round(time.monotonic() - t0, 3)
        if (not url or "first_health_s" in result) and (not path or "ready_file_s" in result):
            return
        time.sleep(0.02)


def run_phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside the new network namespace: start the pod, time its first answer, optionally wait for
    its checkpoint, ask again, stop it with SIGTERM (as kubelet does)."""
    lo_up()
    url, body = spec["url"], spec.get("body")
    outcome_path = Path(spec["outcome"])
    outcome_path.unlink(missing_ok=True)  # a previous pod's outcome must not be read as this one's
    if spec.get("ready_file"):
        Path(spec["ready_file"]).unlink(missing_ok=True)  # nor its ready file
    log = open(spec["log"], "ab")  # noqa: SIM115  (the pod's stdout for the whole phase)
    env = {**os.environ, **spec.get("runtime_env", {}), **spec.get("env", {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    # A fresh container (thaw/dev/sandbox.py, the tests' pods too): new tmpfs over its writable
    # places, the paths it is given (store, plan, outcome, "volumes") bound back; before hide_dev,
    # which binds /dev/shm. The environment is this process's (the GPU machine's CUDA and library
    # settings), not a bare container's.
    argv = pod_command(
        spec["thaw_args"], spec["cmd"], env, volumes=[spec["outcome"], *spec.get("volumes", [])],
        wrap=spec.get("wrap", []), thaw=spec.get("thaw"), before=hide_dev_prefix(spec.get("hide_dev", [])),
    )  # fmt: skip
    t0 = time.monotonic()
    # The pod's stdout is a pipe, as a container's is (a file opened outside the pod's mount
    # namespace could not be dumped: CRIU cannot find its mount), copied to the log by a thread.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    copier = threading.Thread(target=_copy, args=(proc, log), daemon=True)
    copier.start()
    result: dict[str, Any] = {"name": spec["name"]}
    # When did the server's readiness URL first answer (what kubelet's probe would see), and when
    # did the ready file appear: beside the first answer, whether "ready" came before the GPU state.
    watcher = threading.Thread(target=_watch_ready, args=(spec, proc, t0, result), daemon=True)
    watcher.start()
    first = None
    deadline = t0 + float(spec.get("timeout", 600))
    while time.monotonic() < deadline and proc.poll() is None:
        first = request(url, body, timeout=float(spec.get("request_timeout", 30)))
        if first is not None:
            break
        time.sleep(0.05)
    result["first_answer_s"] = round(time.monotonic() - t0, 3) if first is not None else None
    result["first"] = first
    if first is not None and spec.get("wait_checkpoint"):
        while time.monotonic() < deadline and proc.poll() is None:  # a pod that died will not publish
            ck = read_json(outcome_path).get("checkpoint", {})
            if ck.get("status") in ("published", "failed"):
                break
            time.sleep(0.2)
        result["after_checkpoint"] = request(url, body, timeout=60)
    if first is not None and spec.get("again"):
        result["again"] = request(url, body, timeout=60)
    # thaw exec records a restore's result once its own readiness check passed, which can be a
    # moment after the client's first answer.
    settle = time.monotonic() + 15
    while "result" not in read_json(outcome_path) and time.monotonic() < settle:
        time.sleep(0.1)
    result["outcome"] = read_json(outcome_path)
    result["exit"] = stop_pod(proc, 60)
    watcher.join(5)
    copier.join(10)
    log.close()
    return result


def phase(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh network namespace (a child process) and return its result."""
    out = subprocess.run(
        ["unshare", "--net", sys.executable, "-m", "bench.gpu.harness", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        },
        timeout=float(spec.get("timeout", 600)) + 120,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"name": spec["name"], "error": (out.stderr or out.stdout)[-2000:]}
    value: dict[str, Any] = json.loads(lines[-1])
    return value


if __name__ == "__main__":
    print(json.dumps(run_phase(json.loads(sys.argv[1]))), flush=True)
