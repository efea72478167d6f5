"""A two-process stand-in for a tensor-parallel server: the HTTP front (rank 0) forks a worker
(rank 1) and talks to it over an established loopback TCP connection, as NCCL's bootstrap does. The
worker holds the state. ``python ranks_server.py PORT``; ``GET /state`` -> {"sum": N, "ranks": [pids]};
``POST /add`` adds one in the worker. Checkpointed and restored as one tree, the connection must
come back open (``thaw exec --tcp-established``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def worker(conn: socket.socket) -> None:
    total = 0
    f = conn.makefile("rwb", buffering=0)
    for line in f:
        total += int(line.split()[1])
        f.write(f"{total} {os.getpid()}\n".encode())


class Front:
    conn: socket.socket
    rfile: object


def ask(n: int) -> tuple[int, int]:
    Front.conn.sendall(f"add {n}\n".encode())
    line = Front.rfile.readline()  # type: ignore[attr-defined]
    total, pid = line.split()
    return int(total), int(pid)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, n: int) -> None:
        total, pid = ask(n)
        raw = json.dumps({"sum": total, "ranks": [os.getpid(), pid]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        self._send(0)

    def do_POST(self) -> None:
        self._send(1)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main(port: int) -> int:
    lsock = socket.create_server(("127.0.0.1", 0))
    child = os.fork()
    if child == 0:
        addr = lsock.getsockname()
        lsock.close()
        c = socket.create_connection(addr)
        worker(c)
        os._exit(0)
    Front.conn, _ = lsock.accept()
    lsock.close()
    Front.rfile = Front.conn.makefile("rb")
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
