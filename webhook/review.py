"""From request bytes to response bytes: the AdmissionReview envelope around ``webhook.mutate``.

Pure (no Flask, no clock), so every rule below is tested without a server:

- the body is not JSON, not an ``admission.k8s.io/v1`` ``AdmissionReview``, or has no ``request``
  with a ``uid``: HTTP 400 with the reason (kube-apiserver then applies ``failurePolicy``);
- anything that goes wrong after that: a valid AdmissionReview that allows the pod unchanged with a
  warning, never a 500 (``failurePolicy: Ignore`` would admit it anyway, but only after a log line
  nobody reads; a warning reaches the user's ``kubectl``);
- only Pod CREATEs are mutated; any other resource, operation or subresource is allowed as it is;
- ``uid`` echoed, ``apiVersion``/``kind`` as kube-apiserver sent them; the namespace comes from the
  request (pods created by controllers have none in ``metadata``);
- ``dryRun`` needs nothing: the mutation has no side effects (``sideEffects: None``).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from webhook.mutate import MalformedPod, Refusal, mutate
from webhook.patches import Prepared
from webhook.types import ADMISSION_API_VERSION, ADMISSION_KIND, AdmissionResponse, Status

log = logging.getLogger(__name__)

Outcome = Literal["mutated", "unchanged", "refused", "error", "invalid"]

_REASONS = {400: "BadRequest", 403: "Forbidden"}
# kube-apiserver may truncate warnings over 256 characters (admission webhook docs); ours are shorter
# and this keeps a surprising value (a long container name) from producing an unreadable one.
MAX_WARNING_CHARS = 256


@dataclass(frozen=True, slots=True)
class Answer:
    http_status: int
    body: bytes
    outcome: Outcome


def _invalid(reason: str) -> Answer:
    return Answer(400, orjson.dumps({"error": reason}), "invalid")


def _answer(response: AdmissionResponse, outcome: Outcome) -> Answer:
    review = {"apiVersion": ADMISSION_API_VERSION, "kind": ADMISSION_KIND, "response": response}
    return Answer(200, orjson.dumps(review), outcome)


def _warning(text: str) -> str:
    # Warnings travel as HTTP Warning headers to kubectl: printable characters only, and short.
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= MAX_WARNING_CHARS else text[: MAX_WARNING_CHARS - 1] + "…"


def _warnings(items: list[str]) -> list[str]:
    return [_warning(w) for w in items]


def build_response(body: bytes, prepared: Prepared, restore_allowed: bool) -> Answer:
    """The HTTP status and body answering one AdmissionReview request body."""
    try:
        review = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return _invalid(f"request body is not JSON: {exc}")
    if not isinstance(review, dict):
        return _invalid(f"request body is a JSON {type(review).__name__}, expected an AdmissionReview object")
    if review.get("kind") != ADMISSION_KIND:
        return _invalid(f"kind is {review.get('kind')!r}, expected {ADMISSION_KIND!r}")
    if review.get("apiVersion") != ADMISSION_API_VERSION:
        return _invalid(
            f"apiVersion is {review.get('apiVersion')!r}, expected {ADMISSION_API_VERSION!r} "
            "(list only v1 in admissionReviewVersions)"
        )
    request = review.get("request")
    if not isinstance(request, dict):
        return _invalid("the AdmissionReview has no request object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return _invalid("request.uid is missing or not a string")
    try:
        return _review(request, uid, prepared, restore_allowed)
    except Exception as exc:  # never a 500: admit unchanged and say why
        log.exception("admission %s: unexpected error, admitting unchanged", uid)
        return _answer(
            {
                "uid": uid,
                "allowed": True,
                "warnings": _warnings([f"thaw: pod admitted unchanged: internal error: {exc}"]),
            },
            "error",
        )


def _review(request: dict[str, Any], uid: str, prepared: Prepared, restore_allowed: bool) -> Answer:
    kind = request.get("kind")
    if (
        not isinstance(kind, dict)
        or kind.get("kind") != "Pod"
        or kind.get("group", "") != ""
        or request.get("operation") != "CREATE"
        or request.get("subResource")
    ):
        # Not a Pod CREATE (a webhook configuration wider than ours): not Thaw's business.
        return _answer({"uid": uid, "allowed": True}, "unchanged")
    pod = request.get("object")
    namespace = request.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        meta = pod.get("metadata") if isinstance(pod, dict) else None
        namespace = meta.get("namespace") if isinstance(meta, dict) else None
        if not isinstance(namespace, str):
            namespace = ""
    try:
        result = mutate(pod, namespace, prepared, restore_allowed)
    except MalformedPod as exc:
        return _answer(
            {"uid": uid, "allowed": True, "warnings": _warnings([f"thaw: pod admitted unchanged: {exc}"])},
            "error",
        )
    if isinstance(result, Refusal):
        status: Status = {
            "code": result.code,
            "message": result.message,
            "reason": _REASONS.get(result.code, "BadRequest"),
        }
        return _answer({"uid": uid, "allowed": False, "status": status}, "refused")
    response: AdmissionResponse = {"uid": uid, "allowed": True}
    if result.ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(orjson.dumps(result.ops)).decode()
    if result.warnings:
        response["warnings"] = _warnings(result.warnings)
    return _answer(response, "mutated" if result.ops else "unchanged")
