"""A small kube-apiserver for Secrets and MutatingWebhookConfigurations, in the real wire format.

A sibling of tests/fakekube.py (Nodes, watches) for the certificate controller (thaw/serve/certctl.py):

- ``GET|PUT /api/v1/namespaces/NS/secrets/NAME``, ``POST /api/v1/namespaces/NS/secrets``;
- ``GET|PUT|PATCH /apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/NAME``,
  ``POST .../mutatingwebhookconfigurations``.

As kube-apiserver does: ``POST`` of an existing name is 409 ``AlreadyExists``; ``PUT`` whose
``metadata.resourceVersion`` is not the stored one is 409 ``Conflict`` (no resourceVersion: an
unconditional update); ``PATCH`` takes ``application/json-patch+json`` (RFC 6902, a failed ``test``
is 422 ``Invalid``), ``application/merge-patch+json``; anything else is 415. Every write bumps a
global resourceVersion; ``uid`` and ``creationTimestamp`` are set on create. Secrets' ``data``
values must be base64 (400 otherwise), as the real server checks. Errors are ``Status`` objects.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import jsonpatch

from tests.fakekube import FakeServer, JsonHandler, merge_patch, status

SECRETS = re.compile(r"^/api/v1/namespaces/(?P<ns>[a-z0-9-]+)/secrets(?:/(?P<name>[a-z0-9.-]+))?$")
MWCS = re.compile(
    r"^/apis/admissionregistration\.k8s\.io/v1/mutatingwebhookconfigurations(?:/(?P<name>[a-z0-9.-]+))?$"
)


class FakeObjects(FakeServer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rv = 1000
        # (resource, namespace or "", name) -> object
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[str] = []  # "METHOD path" in order
        super().__init__(self._handler())

    # ---- test controls -------------------------------------------------------------------------
    def put(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` as if created through the API (sets resourceVersion, uid)."""
        with self._lock:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            self._stamp(obj, created=True)
            self.objects[(resource, meta.get("namespace", ""), meta["name"])] = obj
            return copy.deepcopy(obj)

    def get(self, resource: str, name: str, namespace: str = "") -> dict[str, Any] | None:
        with self._lock:
            obj = self.objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def _stamp(self, obj: dict[str, Any], created: bool) -> None:
        self._rv += 1
        meta = obj["metadata"]
        meta["resourceVersion"] = str(self._rv)
        if created:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = "2026-11-28T00:00:00Z"

    # ---- HTTP ----------------------------------------------------------------------------------
    def _route(self, path: str) -> tuple[str, str, str | None] | None:
        m = SECRETS.match(path)
        if m:
            return "secrets", m.group("ns"), m.group("name")
        m = MWCS.match(path)
        if m:
            return "mutatingwebhookconfigurations", "", m.group("name")
        return None

    def _check(self, resource: str, obj: dict[str, Any]) -> str | None:
        if resource == "secrets":
            for key, value in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(value, validate=True)
                except (binascii.Error, TypeError):
                    return f"Secret data[{key}]: illegal base64 data"
        if resource == "mutatingwebhookconfigurations":
            for i, hook in enumerate(obj.get("webhooks") or []):
                bundle = (hook.get("clientConfig") or {}).get("caBundle")
                if bundle is not None:
                    try:
                        base64.b64decode(bundle, validate=True)
                    except (binascii.Error, TypeError):
                        return f"webhooks[{i}].clientConfig.caBundle: illegal base64 data"
        return None

    def _handler(self) -> type[JsonHandler]:
        fake = self

        class Handler(JsonHandler):
            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _target(self) -> tuple[str, str, str | None] | None:
                path = urlsplit(self.path).path
                fake.requests.append(f"{self.command} {path}")
                route = fake._route(path)
                if route is None:
                    self._json(
                        404, status(404, "NotFound", "the server could not find the requested resource")
                    )
                return route

            def do_GET(self) -> None:
                route = self._target()
                if route is None:
                    return
                resource, ns, name = route
                obj = fake.get(resource, name or "", ns)
                if obj is None:
                    self._json(404, status(404, "NotFound", f'{resource} "{name}" not found'))
                else:
                    self._json(200, obj)

            def do_POST(self) -> None:
                route = self._target()
                if route is None:
                    return
                resource, ns, _ = route
                obj = self._body()
                name = obj.get("metadata", {}).get("name", "")
                if ns:
                    obj["metadata"]["namespace"] = ns
                problem = fake._check(resource, obj)
                if problem:
                    self._json(400, status(400, "BadRequest", problem))
                    return
                with fake._lock:
                    if (resource, ns, name) in fake.objects:
                        self._json(409, status(409, "AlreadyExists", f'{resource} "{name}" already exists'))
                        return
                    obj["metadata"].pop("resourceVersion", None)
                    fake._stamp(obj, created=True)
                    fake.objects[(resource, ns, name)] = obj
                    out = copy.deepcopy(obj)
                self._json(201, out)

            def do_PUT(self) -> None:
                route = self._target()
                if route is None:
                    return
                resource, ns, name = route
                obj = self._body()
                problem = fake._check(resource, obj)
                if problem:
                    self._json(400, status(400, "BadRequest", problem))
                    return
                with fake._lock:
                    old = fake.objects.get((resource, ns, name or ""))
                    if old is None:
                        self._json(404, status(404, "NotFound", f'{resource} "{name}" not found'))
                        return
                    rv = obj.get("metadata", {}).get("resourceVersion")
                    if rv and rv != old["metadata"]["resourceVersion"]:
                        self._json(
                            409,
                            status(
                                409,
                                "Conflict",
                                f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                                "modified; please apply your changes to the latest version and try again",
                            ),
                        )
                        return
                    for key in ("uid", "creationTimestamp"):
                        obj["metadata"][key] = old["metadata"][key]
                    fake._stamp(obj, created=False)
                    fake.objects[(resource, ns, name or "")] = obj
                    out = copy.deepcopy(obj)
                self._json(200, out)

            def do_PATCH(self) -> None:
                route = self._target()
                if route is None:
                    return
                resource, ns, name = route
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                patch = self._body()
                with fake._lock:
                    old = fake.objects.get((resource, ns, name or ""))
                    if old is None:
                        self._json(404, status(404, "NotFound", f'{resource} "{name}" not found'))
                        return
                    try:
                        if ctype == "application/json-patch+json":
                            new = jsonpatch.JsonPatch(patch).apply(copy.deepcopy(old))
                        elif ctype == "application/merge-patch+json":
                            new = merge_patch(old, patch)
                        else:
                            self._json(
                                415,
                                status(
                                    415, "UnsupportedMediaType", f"the media type {ctype!r} is not supported"
                                ),
                            )
                            return
                    except jsonpatch.JsonPatchTestFailed as exc:
                        self._json(422, status(422, "Invalid", f"the server rejected our request: {exc}"))
                        return
                    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                        self._json(422, status(422, "Invalid", str(exc)))
                        return
                    problem = fake._check(resource, new)
                    if problem:
                        self._json(422, status(422, "Invalid", problem))
                        return
                    fake._stamp(new, created=False)
                    fake.objects[(resource, ns, name or "")] = new
                    out = copy.deepcopy(new)
                self._json(200, out)

        return Handler
