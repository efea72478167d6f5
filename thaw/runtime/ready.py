"""Readiness probes for ``thaw exec --ready``: ``http(s)://...``, ``tcp:PORT`` or ``file:PATH``.

The wrapper checkpoints a server only once it answers, the same way kubelet would decide it is
ready. Parsing is pure; probing does one short attempt and reports why it failed.
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

MAX_PORT = 65535


class ReadySpecError(ValueError):
    """A ``--ready`` value that is not one of the allowed forms."""


@dataclass(frozen=True)
class ReadySpec:
    kind: Literal["http", "tcp", "file"]
    target: str  # URL, "host:port", or a path
    port: int = 0


def parse_ready(value: str) -> ReadySpec:
    """Parse ``http://...``/``https://...``, ``tcp:PORT`` (``tcp:HOST:PORT``) or ``file:PATH``."""
    v = value.strip()
    if v.startswith(("http://", "https://")):
        return ReadySpec("http", v)
    if v.startswith("tcp:"):
        rest = v[4:]
        host, _, port_s = rest.rpartition(":")
        host = host or "127.0.0.1"
        if not port_s.isdigit() or not 0 < int(port_s) <= MAX_PORT:
            raise ReadySpecError(f"--ready {value!r}: tcp:PORT needs a port number 1..65535")
        return ReadySpec("tcp", host, int(port_s))
    if v.startswith("file:") and len(v) > 5:
        return ReadySpec("file", v[5:])
    raise ReadySpecError(
        f"--ready {value!r} is not allowed: use an http:// or https:// URL, tcp:PORT or file:PATH"
    )


def probe(spec: ReadySpec, timeout: float = 2.0) -> str | None:
    """One attempt. None when ready, else why not (for the log when waiting gives up)."""
    if spec.kind == "file":
        return None if Path(spec.target).exists() else f"{spec.target} does not exist yet"
    if spec.kind == "tcp":
        try:
            with socket.create_connection((spec.target, spec.port), timeout=timeout):
                return None
        except OSError as exc:
            return f"tcp {spec.target}:{spec.port}: {exc}"
    try:
        # Connection: close, so the probe leaves no established socket behind in the server that
        # the checkpoint would then have to deal with.
        req = urllib.request.Request(spec.target, headers={"Connection": "close"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = int(resp.status)
            resp.read()
        return None if 200 <= status < 400 else f"{spec.target} answered {status}"
    except urllib.error.HTTPError as exc:
        return f"{spec.target} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{spec.target}: {exc}"


def wait_ready(
    spec: ReadySpec,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.2,
) -> str | None:
    """Probe until ready or ``timeout`` seconds pass. None when ready, else the last reason.

    ``alive`` is an optional callable returning False once the workload has exited, to stop early.
    """
    deadline = time.monotonic() + timeout
    reason: str | None = "not probed"
    while True:
        if alive is not None and not alive():
            return "the workload exited before it was ready"
        reason = probe(spec)
        if reason is None:
            return None
        if time.monotonic() >= deadline:
            return f"not ready after {timeout:.0f}s: {reason}"
        time.sleep(interval)
