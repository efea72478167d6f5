"""A stand-in server for the ready-gate tests: ``GET /state`` -> its counter and PID, ``POST /bump``
adds one; beside the serving thread, a thread named ``cuda-restore`` (as the CUDA driver's restore
thread is: the one thread ``--ready-gate stopped`` lets run while GPU memory comes back).

``python3 gate_server.py PORT``. Plain stdlib: it runs as a file in a pod.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

PR_SET_NAME = 15
COUNTER = [0]


def restore_thread() -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"cuda-restore", 0, 0, 0)
    while True:
        time.sleep(0.05)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, body: dict[str, object]) -> None:
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._send({"counter": COUNTER[0], "pid": os.getpid()})

    def do_POST(self) -> None:
        COUNTER[0] += 1
        self._send({"counter": COUNTER[0]})

    def log_message(self, *_: object) -> None:
        pass


if __name__ == "__main__":
    threading.Thread(target=restore_thread, daemon=True).start()
    HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
