"""A small stand-in inference server with state, for ``thaw demo``, the CRIU tests and
bench/runtime_cpu.py (plain stdlib: it runs as a file, ``python3 thaw/dev/standin.py``, in any pod).

``python3 standin.py PORT [--warmup S] [--mem-mb N]``: "warms up" for S seconds of CPU work and
fills N MiB of memory (what a real server spends its start on), then serves on 127.0.0.1:PORT:
``GET /state`` -> JSON with a counter and a digest of the warm-up's result; ``POST /bump`` adds one
to the counter. A restored server must answer with the counter it had when it was checkpointed.

Sleep mode, with vLLM's endpoints (Thaw's sleep/wake hooks, thaw/contract/hooks.py): ``POST /sleep``
(``?level=N`` accepted) lets go of the ``--mem-mb`` memory (a KV cache's stand-in: its content need
not survive) and answers 503 to everything else until ``POST /wake_up`` allocates it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit


class State:
    counter = 0
    digest = ""
    started = 0.0
    pid = 0
    mem_mb = 0
    blob = bytearray()
    asleep = False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing established stays behind

    def _send(self, body: dict[str, object], status: int = 200) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if State.asleep:
            self._send({"error": "asleep"}, 503)
            return
        self._send(
            {
                "counter": State.counter,
                "digest": State.digest,
                "pid": os.getpid(),
                "mem_mb": len(State.blob) >> 20,
            }
        )

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path == "/sleep":
            State.blob, State.asleep = bytearray(), True  # freed: large buffers go back to the kernel
            self._send({"asleep": True})
        elif path == "/wake_up":
            if State.asleep:  # allocated and touched again; its old content is forgotten, as a KV cache's
                State.blob, State.asleep = bytearray(b"\x5a") * (State.mem_mb << 20), False
            self._send({"asleep": False})
        elif State.asleep:
            self._send({"error": "asleep"}, 503)
        elif path == "/bump":
            State.counter += 1
            self._send({"counter": State.counter})
        else:
            self._send({"error": f"no such endpoint: POST {self.path}"}, 404)

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write("request " + (format % args) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    port = int(argv[0])
    warmup = float(argv[argv.index("--warmup") + 1]) if "--warmup" in argv else 0.0
    mem_mb = int(argv[argv.index("--mem-mb") + 1]) if "--mem-mb" in argv else 0
    h = hashlib.sha256()
    deadline = time.monotonic() + warmup
    n = 0
    while time.monotonic() < deadline:
        h.update(n.to_bytes(8, "little") * 512)
        n += 1
    State.mem_mb, State.blob = mem_mb, bytearray(os.urandom(1 << 20)) * mem_mb  # memory a snapshot carries
    h.update(bytes(State.blob[:4096]))
    State.digest = h.hexdigest()
    server = HTTPServer(("127.0.0.1", port), Handler)
    print(f"serving on {port} after {n} warm-up rounds", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
