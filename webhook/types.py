"""Wire types of the admission webhook (``admission.k8s.io/v1`` AdmissionReview, RFC 6902 JSON Patch).

TypedDicts in the style of kopf's ``kopf._cogs.structs``: they describe what the wire carries so that
mypy checks the code that builds answers, without a parsing layer on the hot path. Everything that
comes *in* is still checked at run time (``webhook.review``): the types say what we expect, not what
a client sent.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

ADMISSION_API_VERSION = "admission.k8s.io/v1"
ADMISSION_KIND = "AdmissionReview"

JsonObject = dict[str, Any]


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class AdmissionRequest(TypedDict, total=False):
    uid: str
    kind: GroupVersionKind
    resource: JsonObject
    subResource: str
    requestKind: GroupVersionKind
    name: str
    namespace: str
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    userInfo: JsonObject
    object: JsonObject | None
    oldObject: JsonObject | None
    dryRun: bool
    options: JsonObject | None


class Status(TypedDict, total=False):
    """``metav1.Status`` as an admission response carries it: shown to the user on refusal."""

    code: int
    message: str
    reason: str


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the JSON Patch document
    status: NotRequired[Status]
    warnings: NotRequired[list[str]]


class AdmissionReviewIn(TypedDict):
    apiVersion: str
    kind: str
    request: AdmissionRequest


class AdmissionReviewOut(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


class AddOp(TypedDict):
    op: Literal["add"]
    path: str
    value: Any


class ReplaceOp(TypedDict):
    op: Literal["replace"]
    path: str
    value: Any


class RemoveOp(TypedDict):
    op: Literal["remove"]
    path: str


PatchOp = AddOp | ReplaceOp | RemoveOp


def pointer(*parts: str | int) -> str:
    """An RFC 6901 JSON pointer: ``~`` becomes ``~0`` and ``/`` becomes ``~1`` (in that order)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def add(path: str, value: Any) -> AddOp:
    return {"op": "add", "path": path, "value": value}


def replace(path: str, value: Any) -> ReplaceOp:
    return {"op": "replace", "path": path, "value": value}


def remove(path: str) -> RemoveOp:
    return {"op": "remove", "path": path}
