"""The AdmissionReview envelope: bad input, echoing, namespaces, dryRun, non-Pod requests."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.conftest import load_fixture
from tests.webhook.helpers import annotated, answer, apply, patch_ops
from webhook.config import WebhookConfig
from webhook.patches import Prepared
from webhook.review import MAX_WARNING_CHARS, build_response

PREPARED = Prepared.build(WebhookConfig())
BASE = load_fixture("admissionreview-v1-pod-create.request.json")


def raw(body: bytes, restore: bool = True) -> tuple[int, dict[str, Any], str]:
    a = build_response(body, PREPARED, restore)
    return a.http_status, json.loads(a.body), a.outcome


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"[]", "JSON list"),
        (b'"AdmissionReview"', "JSON str"),
        (b'{"kind":"Pod","apiVersion":"v1"}', "kind is 'Pod'"),
        (
            b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1beta1","request":{"uid":"u"}}',
            "v1beta1",
        ),
        (b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1"}', "no request"),
        (b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":[]}', "no request"),
        (b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{}}', "request.uid"),
        (b'{"kind":"AdmissionReview","apiVersion":"admission.k8s.io/v1","request":{"uid":7}}', "request.uid"),
    ],
)
def test_bad_envelopes_are_http_400_with_reason(body: bytes, reason: str) -> None:
    status, out, outcome = raw(body)
    assert status == 400 and outcome == "invalid"
    assert reason in out["error"]


def test_uid_api_version_and_kind_echoed() -> None:
    review = annotated(BASE)
    review["request"]["uid"] = "0f0e-custom-uid"
    status, out = answer(review, restore=True)
    assert status == 200
    assert (out["apiVersion"], out["kind"], out["response"]["uid"]) == (
        "admission.k8s.io/v1",
        "AdmissionReview",
        "0f0e-custom-uid",
    )
    assert out["response"]["patchType"] == "JSONPatch"


def test_namespace_comes_from_the_request_not_metadata() -> None:
    review = annotated(BASE)
    del review["request"]["object"]["metadata"]["namespace"]  # as for pods created by a ReplicaSet
    review["request"]["namespace"] = "kube-system"
    _, out = answer(review, restore=True)
    assert "patch" not in out["response"]  # excluded namespace, found through the request
    review["request"]["namespace"] = "team-a"
    _, out = answer(review, restore=False)
    assert "kubectl label namespace team-a thaw.dev/restore=allowed" in out["response"]["warnings"][0]


def test_generate_name_pod_is_mutated() -> None:
    review = annotated(load_fixture("admissionreview-v1-pod-create-generatename.request.json"))
    assert "name" not in review["request"]["object"]["metadata"]
    _, out = answer(review, restore=True)
    mutated = apply(review["request"]["object"], out["response"])
    assert (
        mutated["metadata"]["generateName"] == "rejected-"
        and mutated["metadata"]["annotations"]["thaw.dev/injected"]
    )


def test_dry_run_gets_the_same_answer() -> None:
    dry = annotated(load_fixture("admissionreview-v1-pod-create-dryrun.request.json"))
    assert dry["request"]["dryRun"] is True
    wet = copy.deepcopy(dry)
    wet["request"]["dryRun"] = False
    assert answer(dry, restore=True) == answer(wet, restore=True)


@pytest.mark.parametrize(
    "change",
    [
        {"operation": "UPDATE"},
        {"operation": "DELETE", "object": None},
        {"subResource": "status"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    ],
)
def test_anything_but_a_pod_create_is_allowed_untouched(change: dict[str, Any]) -> None:
    review = annotated(BASE)
    review["request"].update(change)
    status, out = answer(review, restore=True)
    assert status == 200 and out["response"] == {"uid": BASE["request"]["uid"], "allowed": True}


def test_refusal_is_a_valid_review_with_status() -> None:
    review = annotated(BASE, {"thaw.dev/snapshot": "ok", "thaw.dev/placement": "maybe"})
    status, out = answer(review, restore=True)
    assert status == 200
    response = out["response"]
    assert response["allowed"] is False and response["uid"] == BASE["request"]["uid"]
    assert response["status"]["code"] == 400 and response["status"]["reason"] == "BadRequest"
    assert "thaw.dev/placement='maybe'" in response["status"]["message"]


def test_malformed_pod_is_admitted_unchanged_with_warning() -> None:
    review = annotated(BASE)
    review["request"]["object"]["spec"]["containers"] = "not a list"
    status, out, outcome = raw(json.dumps(review).encode())
    assert status == 200 and outcome == "error"
    assert out["response"]["allowed"] is True and "patch" not in out["response"]
    assert "admitted unchanged" in out["response"]["warnings"][0]


def test_unexpected_error_is_admitted_unchanged_with_warning() -> None:
    class Broken(frozenset[str]):
        def __contains__(self, _item: object) -> bool:
            raise RuntimeError("boom")

    prepared = Prepared.build(WebhookConfig())
    object.__setattr__(prepared, "excluded_namespaces", Broken())  # an internal fault, not the input's
    a = build_response(json.dumps(annotated(BASE)).encode(), prepared, True)
    out = json.loads(a.body)
    assert a.http_status == 200 and a.outcome == "error"
    assert out["response"] == {
        "uid": BASE["request"]["uid"],
        "allowed": True,
        "warnings": ["thaw: pod admitted unchanged: internal error: boom"],
    }


def test_warnings_are_short_enough_for_kube_apiserver() -> None:
    review = annotated(BASE)
    long_ns = "n" * 63
    review["request"]["namespace"] = long_ns
    _, out = answer(review, restore=False)
    assert all(len(w) <= MAX_WARNING_CHARS for w in out["response"]["warnings"])


def test_warnings_carry_printable_characters_only() -> None:
    review = annotated(BASE, {"thaw.dev/snapshot": "qwen3", "thaw.dev/container": "c"})
    review["request"]["object"]["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"port": "a\nb\x00"}}
    _, out = answer(review, restore=True)
    warnings = out["response"]["warnings"]
    assert any("names no port" in w for w in warnings)
    assert all(w.isprintable() for w in warnings)


def test_patch_from_server_bytes_applies() -> None:
    review = annotated(BASE)
    _, out = answer(review, restore=True)
    assert len(patch_ops(out["response"])) > 5
    apply(review["request"]["object"], out["response"])
