"""Golden matrix (in the manner of Istio's ``pkg/kube/inject/inject_test.go``): one case per feature.

Each ``testdata/CASE.yaml`` is picked up automatically and holds the request namespace, which path
answers it (``restore``: ``/mutate-restore`` or ``/mutate``), configuration keys on top of the
defaults (``config``, webhook/config.py), and the pod (or ``review``: a captured AdmissionReview
from tests/fixtures/k8s, opted in with ``annotations``/``command``/``args``). The answer must:

- apply as a JSON Patch, and give a Pod valid for the Kubernetes 1.30 OpenAPI schema (strict);
- equal ``golden/CASE.json`` (warnings and the mutated pod);
- add nothing when the mutated pod is sent again (reinvocation).

A golden with no case fails the run, and so does a case with no golden. Goldens follow the suite's
one rule (tests/golden.py): ``THAW_REGENERATE_GOLDENS=1 pytest tests/webhook/test_golden.py`` writes
them and skips the comparison (never comparing with a file it just wrote); review the diff, then
run again without the switch. The switch is refused where ``CI=true``.

Also here, over every captured AdmissionReview (4 top-level captures, 17 raw requests): as captured
(no annotation) the answer is "allowed, no patch, no warning"; opted in on ``/mutate``, unchanged
with the warning that says how to allow restore.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests import golden
from tests.conftest import FIXTURES
from tests.webhook.helpers import annotated, answer, apply, load_review, patch_ops, review_files
from webhook.config import parse_config

HERE = Path(__file__).parent
TESTDATA = HERE / "testdata"
GOLDEN = HERE / "golden"
K8S_VERSION = "1.30"
CASES = sorted(p.stem for p in TESTDATA.glob("*.yaml"))
FILES = review_files()
IDS = [str(p.relative_to(p.parents[1] if p.parent.name == "raw" else p.parent)) for p in FILES]


def load_case(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The case file and the AdmissionReview it describes."""
    case: dict[str, Any] = yaml.safe_load((TESTDATA / f"{name}.yaml").read_text())
    if "review" in case:
        review = load_review(FIXTURES / case["review"])
        review = annotated(review, case["annotations"], args=False)
        container = review["request"]["object"]["spec"]["containers"][0]
        container["command"], container["args"] = case["command"], case["args"]
        return case, review
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": f"uid-{name}",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": case["namespace"],
            "object": case["pod"],
        },
    }
    return case, review


def test_cases_and_goldens_pair_up() -> None:
    """Every golden belongs to a case (an unused one is stale), and there is a case per feature."""
    golden.check_all_used(GOLDEN, "*.json", [f"{c}.json" for c in CASES])
    assert len(CASES) >= 15, CASES


@pytest.mark.parametrize("name", CASES)
def test_case_matches_golden(name: str) -> None:
    case, review = load_case(name)
    pod = review["request"]["object"]
    config = parse_config(case.get("config") or {})
    status, out = answer(review, restore=case["restore"], config=config)
    assert status == 200
    response = out["response"]
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
    mutated = apply(pod, response)
    kubernetes_validate.validate(mutated, K8S_VERSION, strict=True)

    # Reinvocation (reinvocationPolicy: IfNeeded): the mutated pod gets no second patch.
    again_review = copy.deepcopy(review)
    again_review["request"]["object"] = mutated
    status, again = answer(again_review, restore=case["restore"], config=config)
    assert status == 200 and patch_ops(again["response"]) == []

    golden.check_json(GOLDEN / f"{name}.json", {"warnings": response.get("warnings", []), "pod": mutated})


def test_fixtures_found() -> None:
    # 4 top-level captures and 17 raw requests; a missing copy must fail, not skip silently.
    assert len(FILES) == 21


@pytest.mark.parametrize("path", FILES, ids=IDS)
@pytest.mark.parametrize("restore", [False, True], ids=["mutate", "mutate-restore"])
def test_unannotated_passes_untouched(path: Path, restore: bool) -> None:
    review = load_review(path)
    status, out = answer(review, restore)
    assert status == 200
    assert out["apiVersion"] == review["apiVersion"] and out["kind"] == "AdmissionReview"
    assert out["response"] == {"uid": review["request"]["uid"], "allowed": True}


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_annotated_in_unlabelled_namespace_is_admitted_unchanged_with_warning(path: Path) -> None:
    review = annotated(load_review(path))
    status, out = answer(review, restore=False)
    assert status == 200
    response = out["response"]
    assert response["allowed"] is True and "patch" not in response
    (warning,) = response["warnings"]
    ns = review["request"]["namespace"]
    assert "cold start" in warning
    assert f"kubectl label namespace {ns} thaw.dev/restore=allowed" in warning


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_every_capture_is_injected_validly(path: Path) -> None:
    """Opted in on /mutate-restore, every captured pod gets a patch that applies to a valid Pod."""
    review = annotated(load_review(path))
    status, out = answer(review, restore=True)
    assert status == 200 and out["response"]["allowed"] is True
    mutated = apply(review["request"]["object"], out["response"])
    kubernetes_validate.validate(mutated, K8S_VERSION, strict=True)
    assert mutated["metadata"]["annotations"]["thaw.dev/injected"] == "v2"
