"""A small stand-in inference server with state, for ``thaw demo``, the CRIU tests and
bench/runtime_cpu.py (plain stdlib: it runs as a file, ``python3 thaw/dev/standin.py``, in any pod).

``python3 standin.py PORT [--warmup S] [--mem-mb N]``: "warms up" for S seconds of CPU work and
fills N MiB of memory (what a real server spends its start on), then serves on 127.0.0.1:PORT:
``GET /state`` -> JSON with a counter and a digest of the warm-up's result; ``POST /bump`` adds one
to the counter. A restored server must answer with the counter it had when it was checkpointed.

Sleep mode, with vLLM's endpoints and their meaning (Thaw's sleep/wake hooks, thaw/contract/hooks.py):
``POST /sleep?level=1`` lets go of the ``--mem-mb`` memory (tag ``kv_cache``: a KV cache's stand-in,
its content need not survive); ``?level=2`` also of the weights that ``--weights FILE`` loaded (tag
``weights``). ``POST /wake_up?tags=T`` (repeatable; none: every tag) takes the memory back, without
the old content: weights woken so hold zeros, and ``GET /state`` reports their digest wrongly, as a
vLLM woken from level 2 without a reload would serve garbage, until ``POST /collective_rpc`` with
``{"method": "reload_weights"}`` reads them again from FILE. ``GET /is_sleeping`` says whether any
tag is asleep; while one is, the other endpoints answer 503.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

TAGS = ("weights", "kv_cache")  # vLLM's memory tags (CuMemAllocator)


def sleep_tags(query: str) -> frozenset[str] | str:
    """What ``POST /sleep?QUERY`` lets go of, as vLLM does: level 1 (the default) the KV cache (the
    weights go to host memory and stay), level 2 the weights too; a message for a bad level."""
    level = parse_qs(query).get("level", ["1"])[-1]
    if level not in ("1", "2"):
        return f"level must be 1 or 2, not {level!r}"
    return frozenset(TAGS) if level == "2" else frozenset({"kv_cache"})


def wake_tags(query: str) -> frozenset[str] | str:
    """What ``POST /wake_up?QUERY`` takes back: its ``tags`` (repeatable), or every tag when none is
    given (vLLM's ``tags=None``); a message for a tag vLLM does not have."""
    tags = parse_qs(query).get("tags", [])
    unknown = sorted(set(tags) - set(TAGS))
    if unknown:
        return f"unknown tags {unknown}: use {', '.join(TAGS)}"
    return frozenset(tags or TAGS)


def rpc_method(body: bytes) -> str | None:
    """The ``method`` of a ``POST /collective_rpc`` body (vLLM's: JSON with method, args, kwargs,
    timeout), or None when there is none."""
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return None
    method = data.get("method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None


class State:
    counter = 0
    digest = ""
    started = 0.0
    pid = 0
    mem_mb = 0
    blob = bytearray()
    weights_path = ""
    weights_size = 0
    weights = bytearray()
    sleeping: frozenset[str] = frozenset()


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
        if urlsplit(self.path).path == "/is_sleeping":
            self._send({"is_sleeping": bool(State.sleeping)})
            return
        if State.sleeping:
            self._send({"error": "asleep"}, 503)
            return
        self._send(
            {
                "counter": State.counter,
                "digest": State.digest,
                "pid": os.getpid(),
                "mem_mb": len(State.blob) >> 20,
                "weights": hashlib.sha256(State.weights).hexdigest(),  # what answers are computed from
            }
        )

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path in ("/sleep", "/wake_up"):
            tags = sleep_tags(parts.query) if path == "/sleep" else wake_tags(parts.query)
            if isinstance(tags, str):
                self._send({"error": tags}, 400)
                return
            if path == "/sleep":
                if "kv_cache" in tags:
                    State.blob = bytearray()  # freed: large buffers go back to the kernel
                if "weights" in tags:
                    State.weights = bytearray()
                State.sleeping |= tags
            else:
                # Allocated and touched again; the old content is forgotten, as vLLM's woken memory's.
                if "kv_cache" in tags & State.sleeping:
                    State.blob = bytearray(b"\x5a") * (State.mem_mb << 20)
                if "weights" in tags & State.sleeping:
                    State.weights = bytearray(State.weights_size)
                State.sleeping -= tags
            self._send({"asleep": bool(State.sleeping)})
        elif path == "/collective_rpc":
            self._rpc(rpc_method(body))
        elif State.sleeping:
            self._send({"error": "asleep"}, 503)
        elif path == "/bump":
            State.counter += 1
            self._send({"counter": State.counter})
        else:
            self._send({"error": f"no such endpoint: POST {self.path}"}, 404)

    def _rpc(self, method: str | None) -> None:
        if method != "reload_weights":  # the one method of vLLM's workers this stand-in has
            self._send({"error": f"no such method: {method!r} (this server has 'reload_weights')"}, 400)
        elif "weights" in State.sleeping:  # vLLM would write into unmapped memory
            self._send({"error": "the weights are asleep: POST /wake_up?tags=weights first"}, 409)
        else:
            try:
                State.weights[:] = read_weights(State.weights_path, State.weights_size)
            except OSError as exc:
                self._send({"error": f"reload_weights: {exc}"}, 500)
                return
            self._send({"results": [None]})

    def log_message(self, format: str, *args: object) -> None:
        sys.stdout.write("request " + (format % args) + "\n")
        sys.stdout.flush()


def read_weights(path: str, size: int | None = None) -> bytes:
    """The model file's bytes (``size`` of them when given: the file must not have changed)."""
    if not path:
        return b""
    with open(path, "rb") as f:  # closed again: a snapshot holds no model file open
        data = f.read()
    if size is not None and len(data) != size:
        raise OSError(f"{path} has {len(data)} bytes, the server loaded {size}")
    return data


def main(argv: list[str]) -> int:
    port = int(argv[0])
    warmup = float(argv[argv.index("--warmup") + 1]) if "--warmup" in argv else 0.0
    mem_mb = int(argv[argv.index("--mem-mb") + 1]) if "--mem-mb" in argv else 0
    State.weights_path = argv[argv.index("--weights") + 1] if "--weights" in argv else ""
    State.weights = bytearray(read_weights(State.weights_path))
    State.weights_size = len(State.weights)
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
