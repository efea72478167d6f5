"""Start ``thaw webhook`` as a separate process, the way a user (or a Pod) does: for the demo, the
benchmark and the end-to-end tests. Waits until it answers ``/readyz`` over verified HTTPS and every
worker listens (each has its own SO_REUSEPORT socket: a client that connected before the last one
was up would find only the first), and stops it (SIGTERM, then SIGKILL) on exit, so no caller
leaves a server behind.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from thaw.serve.serving import free_port


def make_certs(out: Path) -> Path:
    """``thaw certs`` for 127.0.0.1/localhost into ``out``, as an operator would run it."""
    subprocess.run(
        [sys.executable, "-m", "thaw", "certs", "--out", str(out), "--dns", "localhost", "--ip", "127.0.0.1"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return out


@dataclass
class Running:
    url: str
    ca_file: Path
    process: subprocess.Popen[bytes]
    log_file: Path

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


@contextmanager
def running_webhook(
    cert_dir: Path,
    *,
    port: int | None = None,
    config: Path | None = None,
    workers: int = 2,
    threads: int = 4,
    log_file: Path | None = None,
    start_timeout_s: float = 30.0,
) -> Iterator[Running]:
    port = port or free_port()
    log_file = log_file or cert_dir.parent / f"webhook-{port}.log"
    cmd = [sys.executable, "-m", "thaw", "webhook", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--cert-dir", str(cert_dir), "--workers", str(workers), "--threads", str(threads)]
    if config is not None:
        cmd += ["--config", str(config)]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("THAW_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    with log_file.open("wb") as log:
        # Its own session: a SIGTERM reaches the gunicorn arbiter, which stops its workers.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    run = Running(f"https://127.0.0.1:{port}", cert_dir / "ca.crt", proc, log_file)
    try:
        _wait_ready(run, start_timeout_s, listeners=workers)
        yield run
    finally:
        _stop(proc)


def worker_admissions(metrics: str) -> dict[str, float]:
    """Admissions answered per worker pid, from a ``/metrics`` page (``thaw_webhook_worker_admissions``)."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("thaw_webhook_worker_admissions{"):
            labels, _, value = line.rpartition(" ")
            pid = labels.split('pid="', 1)[1].split('"', 1)[0]
            out[pid] = float(value)
    return out


def tcp_sockets(port: int, state: str) -> list[str]:
    """The inodes of this host's TCP sockets on local ``port`` in ``state`` (/proc/net/tcp and tcp6,
    the kernel's hex state: "0A" listening, "01" established)."""
    inodes: list[str] = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == state and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.append(f[9])
    return inodes


def listening_sockets(port: int) -> int:
    """How many TCP sockets listen on ``port`` on this host."""
    return len(tcp_sockets(port, "0A"))


def _wait_ready(run: Running, timeout_s: float, listeners: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    ctx = run.ssl_context()
    port = int(run.url.rsplit(":", 1)[1])
    while True:
        if run.process.poll() is not None:
            raise RuntimeError(f"thaw webhook exited with {run.process.returncode}:\n{run.log()}")
        try:
            with urllib.request.urlopen(run.url + "/readyz", context=ctx, timeout=2) as resp:
                if resp.status == 200 and listening_sockets(port) >= listeners:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"thaw webhook not ready after {timeout_s}s:\n{run.log()}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session we created: the arbiter and its workers
        proc.wait(timeout=5)
