"""Sleep and wake hooks: the workload's own way to shrink what a snapshot must carry.

A vLLM-class server preallocates most of the GPU's memory as KV cache (``--gpu-memory-utilization
0.9``: ~127 GB of an H200), and the CUDA checkpoint copies every allocated byte into host memory,
so into the snapshot. A server that can let go of that memory and take it back (vLLM's sleep mode:
``POST /sleep?level=1`` offloads the weights to host memory and drops the KV cache, ``POST
/wake_up`` undoes it) is put to sleep just before the checkpoint and woken right after it, and every
restored replica is woken before its readiness check: the snapshot carries the weights, not an
empty cache.

A hook is an ``http(s)://`` URL on the pod's loopback, or a path (``/sleep?level=1``) on the server
that the readiness URL names. Thaw POSTs to it with an empty body and ``Connection: close`` (no
socket left behind for the dump) and waits for a 2xx answer. This module checks and resolves the
forms (pure: the webhook checks the annotations with it); :mod:`thaw.runtime.hooks` does the request.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

MAX_HOOK_LENGTH = 2048


class HookError(ValueError):
    """A hook value that is not one of the allowed forms; the message names it and what is allowed."""


def check_hook(name: str, value: str) -> None:
    """Raise HookError unless ``value`` is an http(s) URL with a host, or a path starting with ``/``."""
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


def resolve_hook(name: str, value: str, ready: str | None) -> str:
    """The URL to POST to: ``value`` itself, or the path joined to the readiness URL's origin.

    ``ready`` is the ``--ready``/``THAW_READY`` value; a path needs it to be an http(s) URL.
    """
    check_hook(name, value)
    if not value.startswith("/"):
        return value
    if ready is None or not ready.startswith(("http://", "https://")):
        raise HookError(
            f"{name}={value!r} is a path, which needs an http(s) readiness URL to name the server "
            f"(the readiness check is {ready or 'not set'}); give a full http:// URL instead"
        )
    origin = urlsplit(ready)
    return f"{origin.scheme}://{origin.netloc}{value}"


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
) -> tuple[str, str] | None:
    """Both hooks resolved (:func:`resolve_hook`), or None when neither is set."""
    check_pair(sleep, wake, names)
    if sleep is None or wake is None:
        return None
    return resolve_hook(names[0], sleep, ready), resolve_hook(names[1], wake, ready)
