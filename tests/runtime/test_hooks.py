"""Sleep and wake hooks (thaw/contract/hooks.py, thaw/runtime/hooks.py): the allowed forms (one URL or
path, or a JSON array of steps), resolution against the readiness URL, how a hook is recorded, and
real POSTs against a real HTTP server for each way a call or a sequence ends."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thaw.contract.hooks import (
    MAX_BODY_BYTES,
    HookError,
    Step,
    check_hook,
    from_json,
    parse_hook,
    render_hook,
    resolve_hook,
    resolve_pair,
    to_json,
)
from thaw.runtime.hooks import HookFailed, call, run

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
    assert resolve_hook("--sleep", value, ready) == (Step(url),)


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
        (Step("http://127.0.0.1:8000/sleep"),),
        (Step("http://127.0.0.1:8000/wake"),),
    )
    with pytest.raises(HookError, match=r"^--sleep needs --wake too"):
        resolve_pair("/sleep", None, READY, names)
    with pytest.raises(HookError, match=r"^--wake needs --sleep too"):
        resolve_pair(None, "/wake", READY, names)


class _Server(ThreadingHTTPServer):
    calls: list[tuple[str, str, bytes]]
    types: list[str | None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.calls.append((self.path, self.headers.get("Connection", ""), body))
        self.server.types.append(self.headers.get("Content-Type"))
        status = int(self.path.rsplit("/", 1)[1])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.calls, srv.types = [], []
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


# --- sequences of steps (vLLM's level-2 wake: three calls) -------------------------------------------

VLLM_WAKE = json.dumps(
    [
        "/wake_up?tags=weights",
        {"url": "/collective_rpc", "body": {"method": "reload_weights"}},
        "/wake_up?tags=kv_cache",
    ]
)


def test_a_sequence_resolves_step_by_step() -> None:
    assert resolve_hook("--wake", VLLM_WAKE, READY) == (
        Step("http://127.0.0.1:8000/wake_up?tags=weights"),
        Step("http://127.0.0.1:8000/collective_rpc", '{"method":"reload_weights"}'),
        Step("http://127.0.0.1:8000/wake_up?tags=kv_cache"),
    )
    # a one-step array and a body with nested values and non-ASCII text
    one = json.dumps([{"url": "http://[::1]:9/x", "body": {"b": [1, {"c": None}], "a": "é"}}])
    assert parse_hook("--sleep", one) == (Step("http://[::1]:9/x", '{"a":"é","b":[1,{"c":null}]}'),)


def test_a_sequence_is_recorded_and_read_back() -> None:
    hook = resolve_hook("--wake", VLLM_WAKE, READY)
    data = to_json(hook)
    assert data == [
        {"url": "http://127.0.0.1:8000/wake_up?tags=weights"},
        {"url": "http://127.0.0.1:8000/collective_rpc", "body": {"method": "reload_weights"}},
        {"url": "http://127.0.0.1:8000/wake_up?tags=kv_cache"},
    ]
    assert from_json("meta", json.loads(json.dumps(data))) == hook  # through the snapshot's JSON
    assert parse_hook("THAW_WAKE", render_hook(hook)) == hook  # through the webhook's env
    # One plain step stays a plain URL, as every snapshot recorded it before sequences existed.
    single = resolve_hook("--wake", "/wake_up", READY)
    assert to_json(single) == render_hook(single) == "http://127.0.0.1:8000/wake_up"
    assert from_json("meta", "http://127.0.0.1:8000/wake_up") == single


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("[", "starts with '[' but is not valid JSON"),
        ('["/a",]', "is not valid JSON"),
        ("[" * 5000 + "]" * 5000, "is not valid JSON"),  # nested too deep for the parser
        ('[{"url": "/a", "body": {"x": NaN}}]', "is not valid JSON"),
        ("[]", "has 0 steps: use a JSON array of 1 to 8 steps"),
        (json.dumps(["/s"] * 9), "has 9 steps: use a JSON array of 1 to 8 steps"),
        ("[" + ",".join(['"/' + "a" * 2000 + '"'] * 17) + "]", "too long"),
        ("[1]", "step 1 is a int: each step is a URL or path, or an object"),
        ('["/a", ["/b"]]', "step 2 is a list"),
        ('[{"url": "/a", "method": "PUT"}]',
         "step 1 has unknown keys ['method']: a step object has only 'url' and 'body'"),
        ('[{"body": {}}]', "step 1 needs 'url', a URL or path (a string), not None"),
        ('[{"url": 5}]', "step 1 needs 'url'"),
        ('[{"url": "/a", "body": "reload_weights"}]', "step 1's body must be a JSON object, not str"),
        ('[{"url": "/a", "body": null}]', "body must be a JSON object, not NoneType"),
        (json.dumps([{"url": "/a", "body": {"k": "x" * MAX_BODY_BYTES}}]),
         "body is 4104 bytes serialized, at most 4096"),
        ('["/a", "sleep"]', "step 2='sleep' is not valid: use an http:// or https:// URL"),
        ('["/a", "http://10.0.0.5:8000/w"]',
         "step 2='http://10.0.0.5:8000/w' is not valid: the host must be this pod's own loopback"),
        ('[{"url": "//h/a"}]', "step 1='//h/a' is not valid: a path must not start with '//'"),
    ],
)  # fmt: skip
def test_invalid_sequences_name_the_step_and_what_is_allowed(value: str, words: str) -> None:
    with pytest.raises(HookError) as err:
        check_hook("annotation thaw.dev/wake", value)
    assert str(err.value).startswith("annotation thaw.dev/wake") and words in str(err.value), str(err.value)


def test_a_path_step_needs_an_http_readiness_url() -> None:
    with pytest.raises(HookError, match=r"^--wake step 2='/collective_rpc' is a path, which needs"):
        resolve_hook("--wake", '["http://127.0.0.1:1/w", {"url": "/collective_rpc", "body": {}}]', "tcp:8000")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (5, "has int: use a JSON array"),
        ({"url": "http://127.0.0.1:1/w"}, "has dict"),
        (["/wake_up"], "has a path '/wake_up' where a recorded hook has only URLs"),
        ("/wake_up", "has a path"),
        ([{"url": "http://127.0.0.1:1/w", "body": [1]}], "body must be a JSON object"),
    ],
)
def test_a_recorded_hook_is_checked_as_an_annotation_is(data: object, words: str) -> None:
    with pytest.raises(HookError, match=f"^the snapshot's wake hook.*{words}"):
        from_json("the snapshot's wake hook", data)


def test_run_calls_the_steps_in_order_with_their_bodies(server: _Server) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    body = '{"method":"reload_weights"}'
    assert run((Step(f"{base}/200"), Step(f"{base}/201", body), Step(f"{base}/204"))) is None
    assert server.calls == [("/200", "close", b""), ("/201", "close", body.encode()), ("/204", "close", b"")]
    assert server.types[1] == "application/json" and "json" not in f"{server.types[0]}{server.types[2]}"


def test_run_stops_at_the_first_failed_step_and_names_it(server: _Server) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    failed = run((Step(f"{base}/200"), Step(f"{base}/404", "{}"), Step(f"{base}/204")))
    # the first step acted: not a refusal, though the failed step itself was refused
    assert failed == HookFailed(f"step 2 of 3: POST {base}/404 answered 404", refused=False)
    assert [c[0] for c in server.calls] == ["/200", "/404"]  # the third never called
    server.calls.clear()
    # refused at the first step: the server did nothing
    assert run((Step(f"{base}/409"), Step(f"{base}/200"))) == HookFailed(
        f"step 1 of 2: POST {base}/409 answered 409", refused=True
    )
    assert run((Step(f"{base}/503"),)) == HookFailed(f"POST {base}/503 answered 503", refused=False)
    assert [c[0] for c in server.calls] == ["/409", "/503"]
