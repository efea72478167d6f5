"""Calling a sleep or wake hook (forms and resolution: :mod:`thaw.contract.hooks`): one POST with an
empty body and ``Connection: close``, so no socket is left behind for the dump.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

# Moving even 140 GB of weights between GPU and host memory takes seconds (10-50 GB/s); beyond this a
# hook is taken as hung.
HOOK_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class HookFailed:
    """Why a hook call did not succeed. ``refused``: the server answered 4xx (no such endpoint, not
    allowed), so it did not act on the request; after a 5xx, a timeout or a lost connection it may
    have acted on it in part."""

    reason: str
    refused: bool


def call(url: str, timeout: float = HOOK_TIMEOUT_S) -> HookFailed | None:
    """POST to ``url``; None on a 2xx answer, else why not."""
    req = urllib.request.Request(url, data=b"", method="POST", headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = int(resp.status)
            resp.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        return HookFailed(f"POST {url}: {exc}", refused=False)
    if 200 <= status < 300:
        return None
    return HookFailed(f"POST {url} answered {status}", refused=400 <= status < 500)
