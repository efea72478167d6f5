"""A small kube-apiserver for Nodes, speaking the real wire format, for tests of Thaw's clients.

What the official ``kubernetes`` Python client (or kubectl) sees is what kube-apiserver sends:

- ``GET /api/v1/nodes``: a ``NodeList`` with ``metadata.resourceVersion``; ``limit`` and
  ``continue`` paginate (the continue token is opaque; a stale one gets 410 like the real server).
- ``GET /api/v1/nodes?watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=N``: a
  chunked stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``.
  A resourceVersion older than the compaction point gets, as kube-apiserver does, HTTP 200 and one
  ERROR event whose object is a ``Status`` with ``code: 410, reason: Expired``. ``resourceVersion``
  empty or ``0`` first sends ADDED for every Node. Bookmarks carry only ``metadata.resourceVersion``.
- ``GET /api/v1/nodes/NAME``, ``PATCH /api/v1/nodes/NAME`` with ``application/merge-patch+json``
  or ``application/strategic-merge-patch+json`` (for maps such as ``metadata.annotations`` the two
  are the same: ``null`` deletes a key), each change a new resourceVersion and a MODIFIED event.
- ``POST /api/v1/namespaces/NS/events``: creates a core/v1 Event (201 with the stored object, its
  uid, resourceVersion and creationTimestamp set); a name that exists gets 409 ``AlreadyExists``, a
  body whose namespace differs from the path's 400, as kube-apiserver answers.
- Errors are ``Status`` objects (``NotFound`` 404, ``UnsupportedMediaType`` 415, ``BadRequest``,
  ``AlreadyExists`` 409).

Test controls (Python): :meth:`FakeKube.add`, :meth:`update`, :meth:`delete`, :meth:`compact`
(expire old resourceVersions), :meth:`drop_watches` (cut every open watch mid-stream, no final
chunk), :meth:`fail_next_lists` (500s, to exercise backoff), and counters of requests seen.
"""

from __future__ import annotations

import base64
import copy
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

NODES_PATH = "/api/v1/nodes"
PODS_PATH = "/api/v1/pods"  # list across namespaces, with fieldSelector spec.nodeName=NAME


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what a strategic merge patch does to plain maps)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class JsonHandler(BaseHTTPRequestHandler):
    """What both fake servers' handlers share: HTTP/1.1, quiet, JSON answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class FakeServer:
    """A threaded HTTP server on a free loopback port; subclasses supply the handler class."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def api_client(self) -> Any:
        """An official ``kubernetes.client.ApiClient`` pointed at this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)


class FakeKube(FakeServer):
    def __init__(self, bookmark_interval_s: float = 1.0) -> None:
        self.bookmark_interval_s = bookmark_interval_s
        self._cond = threading.Condition()
        self._rv = 100
        self._compacted = 0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # the Node watch's history
        self.core_events: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> Event
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> Pod (what the node agent lists)
        # Other objects by API path, served to GET: by default the agent's admission policies as
        # shipped (the agent refuses to run without them: thaw/node/policy.py).
        self.objects: dict[str, dict[str, Any]] = shipped_agent_policies()
        self._watch_sockets: set[socket.socket] = set()
        self._fail_lists = 0
        self.requests: list[str] = []  # "METHOD path?query" in order
        self.lists = 0
        self.watches = 0
        super().__init__(self._handler())

    # ---- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        self.drop_watches()
        super().stop()

    # ---- state changes -------------------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        return self._rv

    def _record(self, kind: str, node: dict[str, Any]) -> None:
        self._rv += 1
        node["metadata"]["resourceVersion"] = str(self._rv)
        self.events.append((self._rv, kind, copy.deepcopy(node)))
        self._cond.notify_all()

    def add(self, node: dict[str, Any]) -> None:
        with self._cond:
            node = copy.deepcopy(node)
            self.nodes[node["metadata"]["name"]] = node
            self._record("ADDED", node)

    def add_pod(self, pod: dict[str, Any]) -> None:
        with self._cond:
            self.pods[pod["metadata"]["uid"]] = copy.deepcopy(pod)

    def update(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            node = merge_patch(self.nodes[name], patch)
            self.nodes[name] = node
            self._record("MODIFIED", node)
            return copy.deepcopy(node)

    def delete(self, name: str) -> None:
        with self._cond:
            node = self.nodes.pop(name)
            self._record("DELETED", node)

    def compact(self) -> None:
        """Forget history up to now: a watch or continue from an older resourceVersion gets 410."""
        with self._cond:
            self._compacted = self._rv
            self.events.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no terminating chunk), as a LB reset does."""
        with self._cond:
            socks = list(self._watch_sockets)
            self._watch_sockets.clear()
            self._cond.notify_all()
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def fail_next_lists(self, n: int) -> None:
        with self._cond:
            self._fail_lists = n

    # ---- HTTP ----------------------------------------------------------------------------------
    def _handler(self) -> type[JsonHandler]:
        kube = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                kube.requests.append(f"GET {self.path}")
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if url.path == PODS_PATH:
                    kube._serve_pods(self, query)
                elif url.path == NODES_PATH:
                    if query.get("watch") in ("1", "true"):
                        kube._serve_watch(self, query)
                    else:
                        kube._serve_list(self, query)
                elif url.path.startswith(NODES_PATH + "/"):
                    name = url.path[len(NODES_PATH) + 1 :]
                    with kube._cond:
                        node = copy.deepcopy(kube.nodes.get(name))
                    if node is None:
                        self._json(404, status(404, "NotFound", f'nodes "{name}" not found'))
                    else:
                        self._json(200, node)
                elif url.path in kube.objects:
                    self._json(200, copy.deepcopy(kube.objects[url.path]))
                else:
                    self._json(
                        404, status(404, "NotFound", "the server could not find the requested resource")
                    )

            def do_PATCH(self) -> None:
                kube.requests.append(f"PATCH {self.path}")
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                name = url.path[len(NODES_PATH) + 1 :] if url.path.startswith(NODES_PATH + "/") else ""
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    self._json(
                        415,
                        status(
                            415,
                            "UnsupportedMediaType",
                            f"the body of the request was in an unknown format - accepted media types "
                            f"include: application/merge-patch+json, application/strategic-merge-patch+json "
                            f"(got {ctype!r})",
                        ),
                    )
                    return
                try:
                    patch = json.loads(raw)
                    if not isinstance(patch, dict):
                        raise ValueError("a merge patch must be a JSON object")
                except ValueError as exc:
                    self._json(400, status(400, "BadRequest", f"error decoding patch: {exc}"))
                    return
                with kube._cond:
                    if name not in kube.nodes:
                        self._json(404, status(404, "NotFound", f'nodes "{name}" not found'))
                        return
                    patch.get("metadata", {}).pop("resourceVersion", None)
                    node = kube.update(name, patch)
                self._json(200, node)

            def do_POST(self) -> None:
                kube.requests.append(f"POST {self.path}")
                parts = urlsplit(self.path).path.strip("/").split("/")
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if (
                    len(parts) != 5
                    or parts[:2] != ["api", "v1"]
                    or parts[2] != "namespaces"
                    or parts[4] != "events"
                ):
                    self._json(
                        404, status(404, "NotFound", "the server could not find the requested resource")
                    )
                    return
                namespace = parts[3]
                try:
                    event = json.loads(raw)
                    name = event["metadata"]["name"]
                except (ValueError, KeyError, TypeError) as exc:
                    self._json(400, status(400, "BadRequest", f"error decoding Event: {exc}"))
                    return
                if event["metadata"].get("namespace", namespace) != namespace:
                    msg = (
                        "the namespace of the provided object does not match the namespace sent on "
                        "the request"
                    )
                    self._json(400, status(400, "BadRequest", msg))
                    return
                with kube._cond:
                    if (namespace, name) in kube.core_events:
                        self._json(409, status(409, "AlreadyExists", f'events "{name}" already exists'))
                        return
                    kube._rv += 1
                    event["metadata"].update(
                        namespace=namespace,
                        uid=f"00000000-0000-4000-8000-{kube._rv:012d}",
                        resourceVersion=str(kube._rv),
                        creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    )
                    kube.core_events[(namespace, name)] = event
                self._json(201, event)

        return Handler

    def _serve_pods(self, h: JsonHandler, query: dict[str, str]) -> None:
        """PodList, filtered by ``fieldSelector=spec.nodeName=NAME`` (the only selector served)."""
        selector = query.get("fieldSelector", "")
        node = selector.removeprefix("spec.nodeName=") if selector.startswith("spec.nodeName=") else None
        if selector and node is None:
            h._json(400, status(400, "BadRequest", f"field selector {selector!r} is not supported here"))
            return
        with self._cond:
            items = [
                copy.deepcopy(p)
                for p in self.pods.values()
                if node is None or (p.get("spec") or {}).get("nodeName") == node
            ]
            rv = self._rv
        h._json(
            200,
            {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(rv)}, "items": items},
        )

    def _serve_list(self, h: JsonHandler, query: dict[str, str]) -> None:
        with self._cond:
            self.lists += 1
            if self._fail_lists > 0:
                self._fail_lists -= 1
                h._json(500, status(500, "InternalError", "injected list failure"))
                return
            names = sorted(self.nodes)
            rv = self._rv
            start = 0
            token = query.get("continue")
            if token:
                try:
                    pos = json.loads(base64.urlsafe_b64decode(token))
                    rv, after = int(pos["rv"]), pos["after"]
                except (ValueError, KeyError, TypeError):
                    h._json(400, status(400, "BadRequest", "invalid continue token"))
                    return
                if rv < self._compacted:
                    h._json(
                        410,
                        status(
                            410,
                            "Expired",
                            "The provided continue parameter is too old to display a consistent list result.",
                        ),
                    )
                    return
                start = next((i for i, n in enumerate(names) if n > after), len(names))
            limit = int(query.get("limit") or 0)
            chosen = names[start : start + limit] if limit > 0 else names[start:]
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if limit > 0 and start + limit < len(names):
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"rv": rv, "after": chosen[-1]}).encode()
                ).decode()
                meta["remainingItemCount"] = len(names) - start - limit
            body = {
                "kind": "NodeList",
                "apiVersion": "v1",
                "metadata": meta,
                "items": [copy.deepcopy(self.nodes[n]) for n in chosen],
            }
        h._json(200, body)

    def _serve_watch(self, h: JsonHandler, query: dict[str, str]) -> None:
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        timeout = float(query.get("timeoutSeconds") or 1800)
        rv_param = query.get("resourceVersion") or "0"
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode() + b"\n"
            h.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
            h.wfile.flush()

        with self._cond:
            self.watches += 1
            sock = h.connection
            self._watch_sockets.add(sock)
            pending: list[tuple[str, dict[str, Any]]] = []
            if rv_param == "0":
                pending = [("ADDED", copy.deepcopy(n)) for n in self.nodes.values()]
                since = self._rv
            else:
                since = int(rv_param)
                if since < self._compacted:
                    pending = [
                        (
                            "ERROR",
                            status(410, "Expired", f"too old resource version: {since} ({self._compacted})"),
                        )
                    ]
                    since = -1
        deadline = time.monotonic() + timeout
        last_bookmark = time.monotonic()
        try:
            for kind, obj in pending:
                chunk({"type": kind, "object": obj})
            while since >= 0:
                with self._cond:
                    if sock not in self._watch_sockets:
                        return  # dropped by drop_watches: no terminating chunk
                    new = [(rv, k, copy.deepcopy(o)) for rv, k, o in self.events if rv > since]
                    if not new:
                        self._cond.wait(timeout=0.05)
                        now = time.monotonic()
                        if now >= deadline:
                            break
                        if bookmarks and now - last_bookmark >= self.bookmark_interval_s:
                            last_bookmark = now
                            new_bm = self._rv
                        else:
                            continue
                    else:
                        new_bm = -1
                if new_bm >= 0:
                    chunk(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": "Node",
                                "apiVersion": "v1",
                                "metadata": {"resourceVersion": str(new_bm), "creationTimestamp": None},
                            },
                        }
                    )
                    since = max(since, new_bm)
                    continue
                for rv, kind, obj in new:
                    chunk({"type": kind, "object": obj})
                    since = rv
            h.wfile.write(b"0\r\n\r\n")  # the server ends the watch (timeoutSeconds)
            h.wfile.flush()
        except OSError:
            pass
        finally:
            with self._cond:
                self._watch_sockets.discard(sock)
            h.close_connection = True


def shipped_agent_policies() -> dict[str, dict[str, Any]]:
    """manifests/base/agent-policy.yaml's policies and bindings, by the API path kube-apiserver serves
    each at."""
    import yaml

    path = Path(__file__).resolve().parent.parent / "manifests" / "base" / "agent-policy.yaml"
    plural = {
        "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
        "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    }
    return {
        f"/apis/admissionregistration.k8s.io/v1/{plural[d['kind']]}/{d['metadata']['name']}": d
        for d in yaml.safe_load_all(path.read_text())
        if d and d.get("kind") in plural
    }


@contextmanager
def running(bookmark_interval_s: float = 1.0) -> Iterator[FakeKube]:
    kube = FakeKube(bookmark_interval_s).start()
    try:
        yield kube
    finally:
        kube.stop()
