"""Sleep and wake hooks (thaw/contract/hooks.py, thaw/runtime/hooks.py): the allowed forms, resolution
against the readiness URL, and one real POST against a real HTTP server for each way a call ends."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thaw.contract.hooks import HookError, check_hook, resolve_hook, resolve_pair
from thaw.runtime.hooks import HookFailed, call

READY = "http://127.0.0.1:8000/health"


@pytest.mark.parametrize(
    ("value", "ready", "url"),
    [
        ("http://127.0.0.1:8000/sleep?level=1", None, "http://127.0.0.1:8000/sleep?level=1"),
        ("https://localhost:9443/wake_up", "tcp:8000", "https://localhost:9443/wake_up"),
        ("http://[::1]:8000/sleep", None, "http://[::1]:8000/sleep"),
        ("http://127.0.0.2:8000/sleep", None, "http://127.0.0.2:8000/sleep"),
        ("/sleep?level=1", READY, "http://127.0.0.1:8000/sleep?level=1"),
        ("/wake_up", "https://127.0.0.1:8443/v1/health", "https://127.0.0.1:8443/wake_up"),
    ],
)
def test_resolve(value: str, ready: str | None, url: str) -> None:
    assert resolve_hook("--sleep", value, ready) == url


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "an http:// or https:// URL"),
        ("sleep", "an http:// or https:// URL"),
        ("ftp://host/sleep", "an http:// or https:// URL"),
        ("http:///sleep", "an http:// or https:// URL"),  # no host
        ("/sleep level=1", "no spaces"),
        ("//host/sleep", "must not start with '//'"),
        ("/" + "a" * 2048, "at most 2048"),
        ("http://10.0.0.5:8000/sleep", "must be this pod's own loopback"),  # a replica has another IP
        ("http://vllm.llm-serving.svc:8000/sleep", "not 'vllm.llm-serving.svc'"),
    ],
)
def test_invalid_forms_name_the_value_and_what_is_allowed(value: str, words: str) -> None:
    with pytest.raises(HookError) as err:
        check_hook("annotation thaw.dev/sleep", value)
    assert f"annotation thaw.dev/sleep={value!r}" in str(err.value) and words in str(err.value)


@pytest.mark.parametrize("ready", [None, "tcp:8000", "file:/tmp/ready"])
def test_a_path_needs_an_http_readiness_url(ready: str | None) -> None:
    with pytest.raises(HookError, match=r"is a path, which needs an http\(s\) readiness URL"):
        resolve_hook("--wake", "/wake_up", ready)


def test_both_or_neither() -> None:
    names = ("--sleep", "--wake")
    assert resolve_pair(None, None, READY, names) is None
    assert resolve_pair("/sleep", "/wake", READY, names) == (
        "http://127.0.0.1:8000/sleep",
        "http://127.0.0.1:8000/wake",
    )
    with pytest.raises(HookError, match=r"^--sleep needs --wake too"):
        resolve_pair("/sleep", None, READY, names)
    with pytest.raises(HookError, match=r"^--wake needs --sleep too"):
        resolve_pair(None, "/wake", READY, names)


class _Server(ThreadingHTTPServer):
    calls: list[tuple[str, str, bytes]]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.calls.append((self.path, self.headers.get("Connection", ""), body))
        status = int(self.path.rsplit("/", 1)[1])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.calls = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_call_posts_an_empty_body_and_closes(server: _Server) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    assert call(f"{base}/200") is None and call(f"{base}/204") is None
    assert server.calls == [("/200", "close", b""), ("/204", "close", b"")]
    # 4xx: refused, so the server did nothing; 5xx: it may have done part of it
    assert call(f"{base}/404") == HookFailed(f"POST {base}/404 answered 404", refused=True)
    assert call(f"{base}/503") == HookFailed(f"POST {base}/503 answered 503", refused=False)


def test_call_to_nothing_is_not_a_refusal() -> None:
    failed = call(f"http://127.0.0.1:{_free_port()}/sleep", timeout=5)
    assert failed is not None and not failed.refused and "refused" in failed.reason.lower()
