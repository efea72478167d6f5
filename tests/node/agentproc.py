"""``thaw agent`` as a process with its metrics server, against tests/fakekube.py (or none)."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.runtime.snapshots import kubeconfig
from thaw.dev.sandbox import stop, thaw_command, thaw_env, wait_for
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

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        def running_and(check: Callable[[], bool] = check) -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"thaw agent exited ({self.proc.returncode}): {self.tail()}")
            return check()

        wait_for(running_and, timeout, what, explain=self.tail)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

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
    env = thaw_env()
    cmd = [*thaw_command(), "agent", "--cache", str(cache), "--budget", str(1 << 30)]
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
        stop(proc)
