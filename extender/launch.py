"""Start ``thaw extender --nodes FILE`` as a separate process, the way an operator runs it without a
cluster: for the demo, the benchmark and the server tests (as webhook/launch.py does for the webhook).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from thaw.runtime.ready import parse_ready, wait_ready


def extender_command(
    port: int, nodes_file: Path | None, *extra: str, threads: int = 2, log_level: str = "warning"
) -> list[str]:
    """The command line of a local ``thaw extender`` on 127.0.0.1:``port`` over ``nodes_file``
    (None: watching the cluster that KUBECONFIG names)."""
    nodes = ["--nodes", str(nodes_file)] if nodes_file is not None else []
    return [
        sys.executable,
        "-m",
        "thaw",
        "--log-level",
        log_level,
        "extender",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *nodes,
        "--threads",
        str(threads),
        *extra,
    ]


def start_ready(
    cmd: list[str], port: int, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (output discarded; ``env``: its environment) and wait until it answers
    ``/readyz`` on ``port``; a server that exits or never gets ready is killed and reported with the
    reason."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    why = wait_ready(
        parse_ready(f"http://127.0.0.1:{port}/readyz"),
        timeout_s,
        alive=lambda: proc.poll() is None,
        interval=0.1,
    )
    if why is not None:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd[2:5])} did not get ready: {why} (exit code {proc.returncode})")
    return proc
