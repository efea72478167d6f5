"""Keep the node index current: list Nodes, then watch them, with the official kubernetes client.

The reflector pattern client-go uses: a paginated list gives the full view and its
``resourceVersion``; a watch from there (``allowWatchBookmarks`` so the resourceVersion stays
fresh on quiet clusters, ``timeoutSeconds`` so the server ends it now and then) applies ADDED,
MODIFIED and DELETED events. A ``410 Gone`` (an ERROR event with a ``Status`` of code 410, reason
``Expired``: the resourceVersion fell out of the apiserver's window) or a dropped connection ends
the watch; the loop relists, with exponential backoff while listing fails.

Readiness (``current``): true after a full list, false from a watch failure until the relist
succeeds. ``ready()`` tolerates ``grace_s`` of that, so a routine reconnect does not take the
extender out of its Service; a longer outage does (and the scheduler, ``ignorable: true``, then
schedules without it rather than from a stale view).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import orjson

from extender.index import NodeIndex

log = logging.getLogger(__name__)

HTTP_GONE = 410


class NodeWatch:
    def __init__(
        self,
        index: NodeIndex,
        api_client: Any = None,
        *,
        page_size: int = 500,
        watch_timeout_s: int = 240,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        grace_s: float = 30.0,
    ) -> None:
        self.index = index
        self._api_client = api_client
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.grace_s = grace_s
        self.current = False
        self._lost_at: float | None = None
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self.relists = 0  # full lists done (the first included), for metrics and tests

    # ---- state ---------------------------------------------------------------------------------
    def ready(self) -> bool:
        if not self.index.synced:
            return False
        if self.current or self._lost_at is None:
            return True
        return time.monotonic() - self._lost_at < self.grace_s

    def _lost(self, why: str) -> None:
        if self.current:
            self._lost_at = time.monotonic()
        self.current = False
        log.info("node watch: %s; relisting", why)

    # ---- the loop ------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="thaw-node-watch", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _core(self) -> Any:
        from kubernetes import client

        if self._api_client is None:
            from kubernetes import config

            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            self._api_client = client.ApiClient()
        return client.CoreV1Api(self._api_client)

    def list_once(self, core: Any) -> str:
        """A full, paginated list into the index; returns the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            resp = core.list_node(**kwargs)
            doc = orjson.loads(resp.data)
            items.extend(doc.get("items") or [])
            meta = doc.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                rv = str(meta.get("resourceVersion") or "")
                break
        bad = self.index.replace_all(items, rv)
        self.relists += 1
        self.current = True
        self._lost_at = None
        log.info("node watch: listed %d nodes at resourceVersion %s (%d unreadable)", len(items), rv, bad)
        return rv

    def watch_once(self, core: Any, rv: str) -> str:
        """Watch from ``rv`` until the server ends the watch; returns the last resourceVersion."""
        from kubernetes import watch

        w = watch.Watch(return_type="object")  # type: ignore[no-untyped-call]  # raw dicts: parse_node reads the API's JSON
        self._watch = w
        try:
            for event in w.stream(  # type: ignore[no-untyped-call]
                core.list_node,
                resource_version=rv,
                allow_watch_bookmarks=True,
                timeout_seconds=self.watch_timeout_s,
                _request_timeout=(10, self.watch_timeout_s + 30),
            ):
                kind = event.get("type")
                obj = event.get("raw_object") or {}
                meta = obj.get("metadata") or {}
                if kind in ("ADDED", "MODIFIED"):
                    self.index.upsert(obj)
                elif kind == "DELETED" and isinstance(meta.get("name"), str):
                    self.index.delete(meta["name"])
                rv = str(meta.get("resourceVersion") or rv)
                self.index.mark_current(rv)
                if self._stop.is_set():
                    break
        finally:
            self._watch = None
        self.index.mark_current(rv)
        return rv

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = self.backoff_initial_s
        rv: str | None = None
        while not self._stop.is_set():
            try:
                core = self._core()
                if rv is None:
                    rv = self.list_once(core)
                    backoff = self.backoff_initial_s
                rv = self.watch_once(core, rv)
                backoff = self.backoff_initial_s
                continue  # the server ended the watch (timeoutSeconds): resume from rv
            except ApiException as exc:
                if exc.status == HTTP_GONE:
                    self._lost(f"resourceVersion {rv} expired (410 Gone)")
                    rv = None
                    continue  # relist at once: the server is fine, our position is not
                self._lost(f"API error {exc.status} {exc.reason}")
                rv = None
            except Exception as exc:
                if self._stop.is_set():
                    break
                self._lost(f"{type(exc).__name__}: {exc}")
                rv = None
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.backoff_max_s)
