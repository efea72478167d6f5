"""``thaw agent`` as a process with its metrics server, against tests/fakekube.py (or none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.runtime.snapshots import kubeconfig
from thaw.serve.serving import free_port

FACTS = {
    "arch": "x86_64",
    "kernel": "6.1.0",
    "gpu": {"product": "NVIDIA-H100-80GB-HBM3", "count": 8},
    "driver": "580.159.04",
    "criu": "4.2.1",
}


@dataclass
class Agent:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def wait(self, what: str, check: object, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"thaw agent exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)

    def samples(self) -> dict[str, float]:
        """``name{labels}`` -> value of every sample on /metrics."""
        code, text = self.get("/metrics")
        assert code == 200, text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out


@contextmanager
def running_agent(
    tmp: Path, cache: Path, kube_url: str | None, node: str = "gpu-1", *extra: str
) -> Iterator[Agent]:
    facts = tmp / "facts.json"
    facts.write_text(json.dumps(FACTS))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THAW_")}
    cmd = [sys.executable, "-m", "thaw", "agent", "--cache", str(cache), "--budget", str(1 << 30)]
    cmd += ["--facts", str(facts), "--interval", "0.5", "--metrics-port", str(port), *extra]
    if kube_url is not None:
        env["KUBECONFIG"] = str(kubeconfig(tmp / "kubeconfig", kube_url))
        cmd += ["--node", node]
    log = tmp / f"agent-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    agent = Agent(port, proc, log)
    try:
        agent.wait("the metrics server", lambda: agent.get("/healthz")[0] == 200)
        yield agent
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
