"""A server whose state lives partly in files a new container does not have (issue 10): the pod-files
tests here and the real-cluster test in tests/e2e/ checkpoint it in one pod and restore it in another.

Self-contained: the standard library only, run as a file by any python3 (3.8 or newer):
``python3 stateful_server.py PORT [--host HOST]`` (host 0.0.0.0 by default).

Warm-up, as a compiled server's start does:

- compiles ``statelib.c`` (beside this file) into a new directory under ``$TMPDIR`` (``/tmp`` when
  unset) with ``cc``, ``gcc`` or ``clang``, or, where no compiler exists, copies the prebuilt
  ``libstate.so`` beside this file there (built with ``cc -shared -fPIC -O2 -nostdlib -s
  -Wl,--build-id=none -o libstate.so statelib.c``); loads it with ctypes. The object keeps the
  request counter in its own data segment;
- makes a random token;
- opens ``$HOME/.cache/app/journal.log`` for reading and appending and keeps it open: one line at
  warm-up and one per ``POST /bump`` (a growing journal);
- listens on a UNIX socket in a new directory of its own under ``$TMPDIR`` (as ZMQ's ``ipc://``
  endpoints of multi-process servers do): ``GET /state`` answers through it too.

Endpoints: ``GET /healthz`` (200 once warm), ``GET /state`` (JSON: ``counter``, ``token``, ``mixed``
(the token's number put through the object's function), ``journal_bytes`` and ``journal_lines``
(read back through the open file), ``journal_lines_at_start`` (lines the journal already had at
warm-up: 0 in a fresh container), ``lib``, ``journal``, ``compiled``, ``pid``, ``ipc`` (the socket's
path) and ``ipc_answer`` (what a connection to it answered)), ``POST /bump``
(counter + 1, a journal line; answers ``{"counter": N}``). Each request is logged on stdout.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import BinaryIO

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "statelib.c")
PREBUILT = os.path.join(HERE, "libstate.so")


class State:
    lib: ctypes.CDLL | None = None
    lib_path: str = ""
    compiled: bool = False
    token: str = ""
    journal: BinaryIO | None = None
    ipc: socket.socket | None = None
    ipc_path = ""
    journal_path = ""
    lines_at_start = 0


def build_library() -> tuple[str, bool]:
    """The shared object's path under $TMPDIR, and whether it was compiled (else copied)."""
    out_dir = tempfile.mkdtemp(prefix="stateful-", dir=tempfile.gettempdir())
    target = os.path.join(out_dir, "libstate.so")
    for compiler in ("cc", "gcc", "clang"):
        path = shutil.which(compiler)
        if path is None:
            continue
        argv = [path, "-shared", "-fPIC", "-O2", "-nostdlib", "-o", target, SOURCE]
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return target, True
    shutil.copyfile(PREBUILT, target)
    return target, False


def warm_up() -> None:
    State.lib_path, State.compiled = build_library()
    lib = ctypes.CDLL(State.lib_path)
    for name in ("state_bump", "state_counter"):
        getattr(lib, name).restype = ctypes.c_ulonglong
    lib.state_mix.restype = ctypes.c_ulonglong
    lib.state_mix.argtypes = [ctypes.c_ulonglong]
    State.lib = lib
    State.token = secrets.token_hex(8)
    cache = os.path.join(os.path.expanduser("~"), ".cache", "app")
    os.makedirs(cache, exist_ok=True)
    State.journal_path = os.path.join(cache, "journal.log")
    journal = open(State.journal_path, "a+b")  # noqa: SIM115  (kept open for the server's life)
    journal.seek(0)
    State.lines_at_start = journal.read().count(b"\n")
    journal.write(f"warm-up {State.token} pid {os.getpid()}\n".encode())
    journal.flush()
    State.journal = journal
    State.ipc_path = os.path.join(
        tempfile.mkdtemp(prefix="stateful-ipc-", dir=tempfile.gettempdir()), "ctl.sock"
    )
    State.ipc = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    State.ipc.bind(State.ipc_path)
    State.ipc.listen(4)


def ipc_answer() -> str:
    """One round trip through the UNIX socket: a client connects, the server answers its token."""
    assert State.ipc is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(State.ipc_path)
        conn, _ = State.ipc.accept()
        with conn:
            conn.sendall(State.token.encode())
        return client.recv(64).decode()


def state() -> dict[str, object]:
    assert State.lib is not None
    journal = State.journal
    assert journal is not None
    journal.seek(0)
    text = journal.read()
    return {
        "counter": int(State.lib.state_counter()),
        "token": State.token,
        "mixed": int(State.lib.state_mix(int(State.token, 16))),
        "journal_bytes": len(text),
        "journal_lines": text.count(b"\n"),
        "journal_lines_at_start": State.lines_at_start,
        "lib": State.lib_path,
        "journal": State.journal_path,
        "compiled": State.compiled,
        "pid": os.getpid(),
        "ipc": State.ipc_path,
        "ipc_answer": ipc_answer(),
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing established stays behind

    def _send(self, body: object, status: int = 200) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._send("ok")
        elif self.path == "/state":
            self._send(state())
        else:
            self._send({"error": f"no such endpoint: GET {self.path}"}, 404)

    def do_POST(self) -> None:
        if self.path != "/bump":
            self._send({"error": f"no such endpoint: POST {self.path}"}, 404)
            return
        assert State.lib is not None and State.journal is not None
        n = int(State.lib.state_bump())
        State.journal.write(f"bump {n}\n".encode())
        State.journal.flush()
        self._send({"counter": n})

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write("request " + (format % args) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        sys.stderr.write("usage: stateful_server.py PORT [--host HOST]\n")
        return 2
    port = int(argv[0])
    host = argv[argv.index("--host") + 1] if "--host" in argv else "0.0.0.0"
    warm_up()
    server = HTTPServer((host, port), Handler)
    print(
        f"serving on {host}:{port}: lib {State.lib_path} ({'compiled' if State.compiled else 'prebuilt'}),"
        f" journal {State.journal_path}",
        flush=True,
    )
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
