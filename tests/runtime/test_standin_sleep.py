"""The CPU stand-in's sleep mode behaves as vLLM's (thaw/dev/standin.py): level 2 lets go of the
weights, ``/wake_up`` maps memory back without its content, ``/collective_rpc`` ``reload_weights``
reads the model file again; a server woken without the reload answers wrongly. A real process over
real HTTP, driven by Thaw's own hook runner with the sequences the docs give."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from thaw.contract.hooks import resolve_hook
from thaw.dev.sandbox import STANDIN, wait_for
from thaw.dev.standin import rpc_method, sleep_tags, wake_tags
from thaw.runtime.hooks import HookFailed, run

VLLM_WAKE = json.dumps(
    [
        "/wake_up?tags=weights",
        {"url": "/collective_rpc", "body": {"method": "reload_weights"}},
        "/wake_up?tags=kv_cache",
    ]
)


def test_request_forms() -> None:
    assert sleep_tags("") == sleep_tags("level=1") == frozenset({"kv_cache"})
    assert sleep_tags("level=2") == frozenset({"weights", "kv_cache"})
    assert sleep_tags("level=3") == "level must be 1 or 2, not '3'"
    assert wake_tags("") == frozenset({"weights", "kv_cache"})  # no tags: everything
    assert wake_tags("tags=weights") == frozenset({"weights"})
    assert wake_tags("tags=weights&tags=kv_cache") == frozenset({"weights", "kv_cache"})
    assert wake_tags("tags=kv") == "unknown tags ['kv']: use weights, kv_cache"
    assert rpc_method(b'{"method": "reload_weights", "args": []}') == "reload_weights"
    assert rpc_method(b"") is None and rpc_method(b"[1]") is None and rpc_method(b"{") is None


class Server:
    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def state(self) -> dict[str, Any]:
        status, body = self.request("GET", "/state")
        assert status == 200, body
        return body


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(3 << 20))
    return path


@pytest.fixture
def server(model: Path) -> Iterator[Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen(
        [sys.executable, str(STANDIN), str(port), "--mem-mb", "4", "--weights", str(model)],
        stdout=subprocess.DEVNULL,
    )
    srv = Server(port)
    try:
        wait_for(lambda: _answers(srv), 20, "the stand-in to serve")
        yield srv
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(srv: Server) -> bool:
    try:
        return srv.request("GET", "/is_sleeping")[0] == 200
    except OSError:
        return False


def test_level_2_then_the_vllm_wake_sequence_serves_the_model(server: Server, model: Path) -> None:
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert server.state()["weights"] == digest
    assert run(resolve_hook("--sleep", "/sleep?level=2", server.base)) is None
    assert server.request("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert server.request("GET", "/state")[0] == 503
    assert run(resolve_hook("--wake", VLLM_WAKE, server.base)) is None
    assert server.request("GET", "/is_sleeping") == (200, {"is_sleeping": False})
    state = server.state()
    assert state["weights"] == digest and state["mem_mb"] == 4


def test_woken_without_the_reload_it_answers_wrongly(server: Server, model: Path) -> None:
    assert run(resolve_hook("--sleep", "/sleep?level=2", server.base)) is None
    assert run(resolve_hook("--wake", "/wake_up", server.base)) is None  # level 1's wake: memory, no content
    state = server.state()  # serving, as vLLM would, from weights that are not the model's
    assert (
        state["weights"]
        == hashlib.sha256(bytes(3 << 20)).hexdigest()
        != hashlib.sha256(model.read_bytes()).hexdigest()
    )


def test_level_1_keeps_the_weights(server: Server, model: Path) -> None:
    assert run(resolve_hook("--sleep", "/sleep?level=1", server.base)) is None
    assert run(resolve_hook("--wake", "/wake_up", server.base)) is None
    assert server.state()["weights"] == hashlib.sha256(model.read_bytes()).hexdigest()


def test_out_of_order_and_unknown_calls_are_refused(server: Server) -> None:
    assert run(resolve_hook("--sleep", "/sleep?level=2", server.base)) is None
    # reloading before the weights' memory is back: refused at step 1, so nothing happened
    wrong_order = json.dumps([{"url": "/collective_rpc", "body": {"method": "reload_weights"}}, "/wake_up"])
    assert run(resolve_hook("--wake", wrong_order, server.base)) == HookFailed(
        f"step 1 of 2: POST {server.base}/collective_rpc answered 409", refused=True
    )
    typo = json.dumps(
        ["/wake_up?tags=weights", {"url": "/collective_rpc", "body": {"method": "reload_weight"}}]
    )
    failed = run(resolve_hook("--wake", typo, server.base))
    assert failed == HookFailed(f"step 2 of 2: POST {server.base}/collective_rpc answered 400", refused=False)
    assert server.request("POST", "/wake_up?tags=kv") == (
        400,
        {"error": "unknown tags ['kv']: use weights, kv_cache"},
    )
    assert server.request("POST", "/sleep?level=0")[0] == 400
