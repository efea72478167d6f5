"""Golden tests over every captured AdmissionReview (Istio style: input pod -> expected mutated pod).

Each file is answered twice: as captured (no thaw.dev annotations: untouched, no patch, no warning)
and opted in (annotation plus a command): the patch must apply with jsonpatch, the result must be a
valid Pod for the Kubernetes 1.30 OpenAPI schema (kubernetes-validate, strict), must equal the golden
file, and a second pass over it must add nothing. Regenerate the golden files after an intended
change with ``THAW_REGEN_GOLDEN=1 pytest tests/webhook/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import kubernetes_validate
import pytest

from tests.webhook.helpers import annotated, answer, apply, load_review, patch_ops, review_files

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("THAW_REGEN_GOLDEN") == "1"
K8S_VERSION = "1.30"
FILES = review_files()
IDS = [str(p.relative_to(p.parents[1] if p.parent.name == "raw" else p.parent)) for p in FILES]


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
def test_annotated_matches_golden(path: Path) -> None:
    review = annotated(load_review(path))
    pod = review["request"]["object"]
    status, out = answer(review, restore=True)
    assert status == 200 and out["response"]["allowed"] is True
    assert out["response"]["uid"] == review["request"]["uid"]
    mutated = apply(pod, out["response"])
    kubernetes_validate.validate(mutated, K8S_VERSION, strict=True)

    golden = GOLDEN / (path.stem.replace(".request", "") + ".json")
    expected = {"warnings": out["response"].get("warnings", []), "pod": mutated}
    if REGEN:
        golden.write_text(json.dumps(expected, indent=2, sort_keys=True) + "\n")
    assert golden.exists(), f"{golden} is missing: run with THAW_REGEN_GOLDEN=1 to write it"
    assert json.loads(golden.read_text()) == expected

    # Reinvocation (reinvocationPolicy: IfNeeded): the mutated pod gets no second patch.
    review["request"]["object"] = mutated
    status, again = answer(review, restore=True)
    assert status == 200 and patch_ops(again["response"]) == []


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
