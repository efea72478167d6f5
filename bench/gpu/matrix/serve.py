"""The matrix programs' HTTP face: ``GET /health`` (200 once the program is ready: it listens only
then) and ``POST /answer`` -> ``{"out": ...}``, the value a restore must reproduce. One request at a
time, HTTP/1.0 (no connection stays open)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


def digest(values: Iterable[float]) -> str:
    """A short digest of floats (exact bits): equal answers, equal digests."""
    h = hashlib.sha256()
    for v in values:
        h.update(struct.pack("<d", float(v)))
    return h.hexdigest()[:16]


def serve(port: int, answer: Callable[[], Any], health: Callable[[], dict[str, Any]] | None = None) -> None:
    """Serve until killed; ``answer()`` is called for every POST /answer."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def _send(self, code: int, body: dict[str, Any]) -> None:
            raw = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._send(200, {"ok": True, "pid": os.getpid(), **(health() if health else {})})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            try:
                self._send(200, {"out": answer()})
            except Exception as exc:  # the client sees why, the server goes on
                self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

        def log_message(self, format: str, *args: object) -> None:
            pass

    print(f"ready on {port}", flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


def port_arg(argv: list[str], default: int = 8000) -> int:
    return int(argv[0]) if argv else default
