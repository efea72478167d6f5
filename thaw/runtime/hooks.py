"""Calling a sleep or wake hook (forms and resolution: :mod:`thaw.contract.hooks`): each step one POST
with ``Connection: close``, so no socket is left behind for the dump; an empty body, or the step's
JSON body as ``application/json``. The steps run in order and the first that fails ends the hook.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass

from thaw.contract.hooks import Hook

# Moving even 140 GB of weights between GPU and host memory takes seconds (10-50 GB/s); beyond this a
# step is taken as hung.
HOOK_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class HookFailed:
    """Why a hook did not succeed. ``refused``: the server answered its first step with 4xx (no such
    endpoint, not allowed), so it did not act on the hook at all; after a 5xx, a timeout, a lost
    connection or a later step's failure it may have acted on it in part."""

    reason: str
    refused: bool


def call(url: str, body: str | None = None, timeout: float = HOOK_TIMEOUT_S) -> HookFailed | None:
    """POST to ``url`` (``body``: JSON text, or None: empty); None on a 2xx answer, else why not."""
    headers = {"Connection": "close"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    data = b"" if body is None else body.encode()
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
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


def run(hook: Hook, timeout: float = HOOK_TIMEOUT_S) -> HookFailed | None:
    """Call the steps of ``hook`` in order (``timeout`` each); None when every one succeeded, else
    why the first that failed did, naming it (``step 2 of 3: POST URL answered 404``)."""
    for i, step in enumerate(hook):
        failed = call(step.url, step.body, timeout)
        if failed is not None:
            if len(hook) == 1:
                return failed
            return HookFailed(
                f"step {i + 1} of {len(hook)}: {failed.reason}", refused=failed.refused and i == 0
            )
    return None
