"""A small stateful HTTP server for the real-pod test: its state exists only in its memory.

``python3 workload_server.py --port PORT [--warmup S]``: at start it "warms up" (S seconds of CPU
work, a stand-in for imports and weight loading) and draws a random token, then serves on every
address of the pod (kubelet probes the pod's IP):

- ``GET /healthz`` -> ``ok`` once warm (the readinessProbe);
- ``GET /state`` -> JSON: the token, a counter, the PID, the start time and the warm-up's digest;
- ``POST /bump`` -> adds one to the counter and returns the state.

A replica restored from a snapshot answers ``/state`` with the token, counter, PID and start time
the checkpointed server had; a cold start draws a new token. Plain stdlib (Debian's python3): the
workload image carries nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


class State:
    token = ""
    counter = 0
    started = 0.0
    digest = ""


def state() -> dict[str, object]:
    return {
        "token": State.token,
        "counter": State.counter,
        "pid": os.getpid(),
        "started": State.started,
        "digest": State.digest,
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: no connection outlives a probe

    def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send(200, b"ok\n", "text/plain")
        elif self.path == "/state":
            self._send(200, json.dumps(state()).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:
        if self.path == "/bump":
            State.counter += 1
            self._send(200, json.dumps(state()).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes every second would fill the container log


def warm_up(seconds: float) -> str:
    h = hashlib.sha256()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        h.update(h.digest())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args()
    State.started = time.time()
    State.digest = warm_up(args.warmup)
    State.token = secrets.token_hex(16)
    server = HTTPServer(("0.0.0.0", args.port), Handler)
    print(f"workload_server: serving on :{args.port}, token {State.token}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
