"""Sleep and wake hooks: the workload's own way to shrink what a snapshot must carry.

A vLLM-class server preallocates most of the GPU's memory as KV cache (``--gpu-memory-utilization
0.9``: ~127 GB of an H200), and the CUDA checkpoint copies every allocated byte into host memory,
so into the snapshot. A server that can let go of that memory and take it back (vLLM's sleep mode:
``POST /sleep?level=1`` offloads the weights to host memory and drops the KV cache, ``POST
/wake_up`` undoes it) is put to sleep just before the checkpoint and woken right after it, and every
restored replica is woken before its readiness check: the snapshot carries the weights, not an
empty cache. At level 2 the weights leave too and waking takes several calls (vLLM: ``/wake_up
?tags=weights``, ``/collective_rpc`` with ``{"method": "reload_weights"}``, ``/wake_up?tags=kv_cache``):
the snapshot then carries neither, and each replica reloads the weights from its model files.

A hook is one step or a sequence of them. One step is an ``http(s)://`` URL on the pod's loopback,
or a path (``/sleep?level=1``) on the server that the readiness URL names. A sequence is a JSON
array (the value starts with ``[``) of 1 to :data:`MAX_STEPS` steps, each such a string or an
object ``{"url": STEP, "body": {...}}`` whose body (a JSON object, at most :data:`MAX_BODY_BYTES`
serialized) is POSTed as ``application/json``. Thaw POSTs each step in order (an empty body unless
one is given) with ``Connection: close`` (no socket left behind for the dump), waits for a 2xx
answer, and stops at the first step that fails. This module checks, resolves and records the forms
(pure: the webhook checks the annotations with it); :mod:`thaw.runtime.hooks` does the requests.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_HOOK_LENGTH = 2048  # one URL or path
MAX_STEPS = 8
MAX_BODY_BYTES = 4096  # a step's body, serialized
MAX_SEQUENCE_LENGTH = 32768  # a whole JSON array: 8 steps of URL and body fit with room to spare
STEP_KEYS = ("url", "body")
_SEQUENCE = (
    f"a JSON array of 1 to {MAX_STEPS} steps, each a URL or path, or an object "
    f'{{"url": URL or path, "body": JSON object}}'
)


class HookError(ValueError):
    """A hook value that is not one of the allowed forms; the message names it and what is allowed."""


@dataclass(frozen=True, slots=True)
class Step:
    """One POST of a hook: ``url`` (a path until resolved) and ``body``, the exact JSON text sent
    (compact, keys sorted), or None for an empty body."""

    url: str
    body: str | None = None


Hook = tuple[Step, ...]  # the steps, in the order they are called


def check_hook(name: str, value: str) -> None:
    """Raise HookError unless ``value`` is one step (a URL or path) or a sequence of steps."""
    parse_hook(name, value)


def parse_hook(name: str, value: str) -> Hook:
    """The steps of ``value`` (paths not yet resolved); HookError names what is wrong with it."""
    if isinstance(value, str) and value.startswith("["):
        if len(value) > MAX_SEQUENCE_LENGTH:
            raise HookError(f"{name} is too long ({len(value)} characters, at most {MAX_SEQUENCE_LENGTH})")
        try:
            items = json.loads(value, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # RecursionError: '[[[[…' nested too deep
            raise HookError(f"{name} starts with '[' but is not valid JSON ({exc}); use {_SEQUENCE}") from exc
        return _steps(name, items)
    _check_url(name, value)
    return (Step(value),)


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _steps(name: str, items: object) -> Hook:
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_STEPS:
        count = f"{len(items)} steps" if isinstance(items, list) else type(items).__name__
        raise HookError(f"{name} has {count}: use {_SEQUENCE}")
    steps = []
    for i, item in enumerate(items, 1):
        where = f"{name} step {i}"
        if isinstance(item, str):
            _check_url(where, item)
            steps.append(Step(item))
            continue
        if not isinstance(item, dict):
            raise HookError(f"{where} is a {type(item).__name__}: each step is a URL or path, or an object "
                            f'{{"url": ..., "body": {{...}}}}')  # fmt: skip
        unknown = sorted(set(item) - set(STEP_KEYS))
        if unknown:
            raise HookError(f"{where} has unknown keys {unknown}: a step object has only 'url' and 'body'")
        url = item.get("url")
        if not isinstance(url, str):
            raise HookError(f"{where} needs 'url', a URL or path (a string), not {url!r}")
        _check_url(where, url)
        body = None
        if "body" in item:
            if not isinstance(item["body"], dict):
                raise HookError(f"{where}'s body must be a JSON object, not {type(item['body']).__name__}")
            body = json.dumps(item["body"], separators=(",", ":"), sort_keys=True, ensure_ascii=False)
            size = len(body.encode())
            if size > MAX_BODY_BYTES:
                raise HookError(f"{where}'s body is {size} bytes serialized, at most {MAX_BODY_BYTES}")
        steps.append(Step(url, body))
    return tuple(steps)


def _check_url(name: str, value: object) -> None:
    """Raise HookError unless ``value`` is an http(s) URL on the loopback, or a path starting with ``/``."""
    allowed = "an http:// or https:// URL, or a path starting with '/' on the readiness URL's server"
    if (
        not isinstance(value, str)  # annotations arrive as JSON: be sure
        or not value
        or len(value) > MAX_HOOK_LENGTH
        or any(c.isspace() or ord(c) < 32 for c in value)
    ):
        raise HookError(
            f"{name}={value!r} is not valid: use {allowed} (no spaces, at most {MAX_HOOK_LENGTH})"
        )
    if value.startswith("/"):
        if value.startswith("//"):
            raise HookError(f"{name}={value!r} is not valid: a path must not start with '//'; use {allowed}")
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HookError(f"{name}={value!r} is not valid: use {allowed}")
    if not _is_loopback(parts.hostname):
        # The snapshot records the wake URL and every replica calls it: only a loopback address
        # names the replica's own server (another pod's IP would wake, or sleep, someone else).
        raise HookError(
            f"{name}={value!r} is not valid: the host must be this pod's own loopback "
            f"(127.0.0.1, ::1 or localhost), not {parts.hostname!r}"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_url(name: str, value: str, ready: str | None) -> str:
    """The URL to POST to: ``value`` itself, or the path joined to the readiness URL's origin.

    ``ready`` is the ``--ready``/``THAW_READY`` value; a path needs it to be an http(s) URL.
    """
    _check_url(name, value)
    if not value.startswith("/"):
        return value
    if ready is None or not ready.startswith(("http://", "https://")):
        raise HookError(
            f"{name}={value!r} is a path, which needs an http(s) readiness URL to name the server "
            f"(the readiness check is {ready or 'not set'}); give a full http:// URL instead"
        )
    origin = urlsplit(ready)
    return f"{origin.scheme}://{origin.netloc}{value}"


def resolve_hook(name: str, value: str, ready: str | None) -> Hook:
    """The steps of ``value`` with every path resolved (:func:`resolve_url`)."""
    steps = parse_hook(name, value)
    if not value.startswith("["):
        return (Step(resolve_url(name, value, ready)),)
    return tuple(Step(resolve_url(f"{name} step {i}", s.url, ready), s.body) for i, s in enumerate(steps, 1))


def check_pair(sleep: str | None, wake: str | None, names: tuple[str, str]) -> None:
    """Raise HookError unless both hooks are valid or neither is set. One without the other is an
    error: a server put to sleep with no way to wake it would never serve again."""
    if sleep is None and wake is None:
        return
    if sleep is None or wake is None:
        given, missing = names if wake is None else names[::-1]
        raise HookError(f"{given} needs {missing} too (set both, or neither)")
    check_hook(names[0], sleep)
    check_hook(names[1], wake)


def resolve_pair(
    sleep: str | None, wake: str | None, ready: str | None, names: tuple[str, str]
) -> tuple[Hook, Hook] | None:
    """Both hooks resolved (:func:`resolve_hook`), or None when neither is set."""
    check_pair(sleep, wake, names)
    if sleep is None or wake is None:
        return None
    return resolve_hook(names[0], sleep, ready), resolve_hook(names[1], wake, ready)


def to_json(hook: Hook) -> str | list[dict[str, Any]]:
    """``hook`` as JSON data, the way it was given: a lone step with no body as its URL (what a
    snapshot recorded before sequences existed), else one object per step."""
    if len(hook) == 1 and hook[0].body is None:
        return hook[0].url
    return [{"url": s.url} if s.body is None else {"url": s.url, "body": json.loads(s.body)} for s in hook]


def render_hook(hook: Hook) -> str:
    """``hook`` as a value :func:`parse_hook` reads back (``THAW_SLEEP``/``THAW_WAKE``)."""
    data = to_json(hook)
    return data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def from_json(name: str, data: object) -> Hook:
    """What :func:`to_json` gave (a snapshot's recorded wake hook: a URL, or a list of steps), checked
    as an annotation is; its steps must be resolved URLs, not paths."""
    steps = parse_hook(name, data) if isinstance(data, str) else _steps(name, data)
    paths = [s.url for s in steps if s.url.startswith("/")]
    if paths:
        raise HookError(f"{name} has a path {paths[0]!r} where a recorded hook has only URLs")
    return steps
