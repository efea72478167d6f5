"""A pod's sandbox on one machine, for ``thaw demo``, the CRIU tests and bench/runtime_cpu.py: a fresh
network namespace (``ip netns``) and a fresh PID and mount namespace (``unshare --pid --fork
--mount-proc``) in which ``thaw exec`` is PID 1, as in a container, with a container runtime's default
capabilities plus what the webhook grants (``with_caps``).

Restoring in a fresh network namespace is what a new pod does, and it avoids the old listener's
TIME_WAIT connections, which block the port in the same namespace for a minute.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# The stand-in server (plain stdlib, run as a file so any python3 in a pod can run it).
STANDIN = Path(__file__).resolve().parent / "standin.py"


# What a container runtime grants by default (containerd's and Docker's default set), and what the
# webhook adds for CRIU (README, "Webhook"). Without SYS_ADMIN, thaw exec runs CRIU --unprivileged;
# with full root CRIU would instead need SYS_ADMIN, NET_ADMIN and SYS_TIME (measured, thaw/runtime/criu.py).
RUNTIME_DEFAULT_CAPS = (
    "chown", "dac_override", "fsetid", "fowner", "mknod", "net_raw", "setgid", "setuid",
    "setfcap", "setpcap", "net_bind_service", "sys_chroot", "kill", "audit_write",
)  # fmt: skip
THAW_CAPS: tuple[str, ...] = ("checkpoint_restore", "sys_ptrace")


def with_caps(caps: tuple[str, ...] | list[str]) -> list[str]:
    """A command prefix that runs as root with only ``caps`` (plus the runtime defaults)."""
    keep = ",".join(f"+{c}" for c in (*RUNTIME_DEFAULT_CAPS, *caps))
    return ["setpriv", f"--bounding-set=-all,{keep}", "--inh-caps=-all", "--"]


def missing_prerequisites() -> str | None:
    """Why the real-CRIU tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (CRIU, network and PID namespaces)"
    for tool in ("ip", "unshare", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2 / util-linux)"
    try:
        from thaw.runtime.criu import find_criu

        find_criu()
    except Exception as exc:
        return f"needs CRIU ({exc}); run `make criu`"
    return None


class Netns:
    def __init__(self, prefix: str = "thaw") -> None:
        self.name = f"{prefix}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"], check=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def http(self, method: str, url: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """One HTTP request from inside the namespace; the JSON answer, or None if it failed."""
        code = (
            "import sys, urllib.request as u\n"
            "r = u.Request(sys.argv[2], data=b'' if sys.argv[1] == 'POST' else None, method=sys.argv[1])\n"
            "print(u.urlopen(r, timeout=float(sys.argv[3])).read().decode())\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", code, method, url, str(timeout)],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout + 10,
        )
        if out.returncode != 0:
            return None
        value: dict[str, Any] = json.loads(out.stdout)
        return value


class Pod:
    """``thaw exec`` as PID 1 in fresh namespaces; its stdout/stderr is a pipe, as a container's is."""

    def __init__(
        self,
        netns: Netns,
        thaw_args: list[str],
        cmd: list[str],
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ):
        self.netns = netns
        self.started = time.monotonic()
        argv = [
            "ip", "netns", "exec", netns.name,
            "unshare", "--pid", "--mount-proc", "--kill-child=SIGTERM", *(wrap or []),
            sys.executable, "-m", "thaw", "exec", *thaw_args, "--", *cmd,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            cwd=REPO,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def thaw_pid(self) -> int | None:
        """thaw exec's PID as seen from here (the child of unshare, PID 1 inside)."""
        from thaw.runtime.criu import children

        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to thaw exec, as kubelet stops a container; unshare returns its exit status."""
        if self.proc.poll() is None:
            pid = self.thaw_pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)
        return self.proc.returncode


def wait_for(predicate: Any, timeout: float, what: str, pod: Pod | None = None, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tail = f"; thaw exec's output:\n{pod.output[-4000:]}" if pod is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


def read_json(path: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(path.read_text())
        return value
    except (OSError, ValueError):
        return {}


def write_facts(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {"arch": "x86_64", "kernel": os.uname().release, "gpu": {"product": "none", "count": 0},
             "driver": "none", "criu": "4.2.1"}
        )
    )  # fmt: skip
    return path


def thaw_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "thaw", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=300,
    )
